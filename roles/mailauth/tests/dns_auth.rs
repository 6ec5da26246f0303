//! iprev, SPF, DKIM, ARC and DMARC against a real DNS server (NSD on loopback) with keys and
//! signatures made by an independent signer (dkimpy). See `common/mod.rs`.

mod common;

use common::{DkimKey, DnsServer, KeyType, TempDir, Zone, reverse_name, tools_available};
use ringmail_mailauth::{
    AuthConfig, AuthResult, Checker, DmarcPolicy, MessageOutcome, SpfIdentity, SpfOutcome,
};
use std::net::IpAddr;
use std::time::Duration;

const TOOLS: &[&str] = &["nsd", "dknewkey", "dkimsign", "openssl"];

/// The legitimate client of sender.test / reject.test / quarantine.test.
const GOOD_IP: &str = "192.0.2.10";
const GOOD_IP6: &str = "2001:db8::10";
/// PTR points at a name whose A record is another address.
const LIAR_IP: &str = "192.0.2.20";
/// No PTR record.
const NOPTR_IP: &str = "192.0.2.30";
/// Not allowed by any SPF record.
const BAD_IP: &str = "192.0.2.66";

struct Fixture {
    _dns: DnsServer,
    rsa: DkimKey,
    ed: DkimKey,
    reject_key: DkimKey,
    checker: Checker,
    _dir: TempDir,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl Fixture {
    fn new() -> Option<Fixture> {
        Self::with_max(10 * 1024 * 1024)
    }

    fn with_max(max_message_bytes_for_dkim: usize) -> Option<Fixture> {
        if !tools_available(TOOLS) {
            return None;
        }
        let dir = TempDir::new("dkim-keys");
        let rsa = DkimKey::cached(dir.path(), "rsa", "sender.test", KeyType::Rsa2048);
        let ed = DkimKey::cached(dir.path(), "ed", "sender.test", KeyType::Ed25519);
        let reject_key = DkimKey::cached(dir.path(), "sel", "reject.test", KeyType::Rsa2048);
        assert!(
            rsa.dns_txt.len() > 255,
            "RSA-2048 record needs several TXT strings"
        );
        let spf = format!("v=spf1 ip4:{GOOD_IP} ip6:{GOOD_IP6} -all");
        let zones = [
            Zone::new("sender.test")
                .rr(&format!("mail A {GOOD_IP}"))
                .rr(&format!("mail AAAA {GOOD_IP6}"))
                .txt("mail", "v=spf1 a -all")
                .rr("liar A 192.0.2.99")
                .txt("@", &spf)
                .txt(&rsa.owner(), &rsa.dns_txt)
                .txt(&ed.owner(), &ed.dns_txt)
                .txt("_dmarc", "v=DMARC1; p=none"),
            Zone::new("reject.test")
                .txt("@", &spf)
                .txt(&reject_key.owner(), &reject_key.dns_txt)
                .txt("_dmarc", "v=DMARC1; p=reject; adkim=r; aspf=r"),
            Zone::new("quarantine.test")
                .txt("@", &spf)
                .txt("_dmarc", "v=DMARC1; p=quarantine"),
            Zone::new("soft.test").txt("@", &format!("v=spf1 ip4:{GOOD_IP} ~all")),
            Zone::new("nospf.test").rr(&format!("@ A {GOOD_IP}")),
            Zone::new("broken.test").txt("@", "v=spf1 include:nospf.test -all"),
            Zone::new("2.0.192.in-addr.arpa")
                .rr(&format!(
                    "{} PTR mail.sender.test.",
                    reverse_name(ip(GOOD_IP))
                ))
                .rr(&format!(
                    "{} PTR liar.sender.test.",
                    reverse_name(ip(LIAR_IP))
                )),
            Zone::new("8.b.d.0.1.0.0.2.ip6.arpa").rr(&format!(
                "{} PTR mail.sender.test.",
                reverse_name(ip(GOOD_IP6))
            )),
        ];
        let dns = DnsServer::start(&zones);
        let mut cfg = AuthConfig::new("mx.ringmail.test");
        cfg.nameserver = Some(dns.addr());
        cfg.timeout = Duration::from_secs(2);
        cfg.max_message_bytes_for_dkim = max_message_bytes_for_dkim;
        let checker = Checker::new(cfg).expect("checker");
        Some(Fixture {
            _dns: dns,
            rsa,
            ed,
            reject_key,
            checker,
            _dir: dir,
        })
    }

    async fn run(
        &self,
        raw: &[u8],
        client: &str,
        mail_from: Option<&str>,
    ) -> (SpfOutcome, MessageOutcome, String) {
        let client = ip(client);
        let helo = "mail.sender.test";
        let iprev = self.checker.iprev(client).await;
        let spf = self.checker.spf(client, helo, mail_from).await;
        let msg = self
            .checker
            .message(raw, client, helo, mail_from, &spf)
            .await;
        let ar = self
            .checker
            .authentication_results(&iprev, &spf, Some(&msg));
        (spf, msg, ar)
    }
}

fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Alice <{from}>\r\nTo: bob@rcpt.test\r\nSubject: {subject}\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject}@sender.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}"
    )
    .into_bytes()
}

fn replace(haystack: &[u8], from: &str, to: &str) -> Vec<u8> {
    let s = String::from_utf8(haystack.to_vec()).unwrap();
    assert!(s.contains(from), "{from:?} not in message");
    s.replacen(from, to, 1).into_bytes()
}

fn unfold(h: &str) -> String {
    h.replace("\r\n\t ", " ").replace("\r\n\t", " ")
}

#[tokio::test]
async fn iprev_pass_fail_permerror() {
    let Some(f) = Fixture::new() else { return };
    let o = f.checker.iprev(ip(GOOD_IP)).await;
    assert_eq!(o.result, AuthResult::Pass, "{o:?}");
    assert_eq!(o.name.as_deref(), Some("mail.sender.test"));

    let o = f.checker.iprev(ip(GOOD_IP6)).await;
    assert_eq!(o.result, AuthResult::Pass, "{o:?}");
    assert_eq!(o.name.as_deref(), Some("mail.sender.test"));

    let o = f.checker.iprev(ip(LIAR_IP)).await;
    assert_eq!(o.result, AuthResult::Fail, "{o:?}");
    assert_eq!(o.name.as_deref(), Some("liar.sender.test"));

    let o = f.checker.iprev(ip(NOPTR_IP)).await;
    assert_eq!(o.result, AuthResult::PermError, "{o:?}");
    assert_eq!(o.name, None);

    let spf = f.checker.spf(ip(LIAR_IP), "x.test", None).await;
    let ar = f.checker.authentication_results(&o, &spf, None);
    assert!(
        unfold(&ar).contains("iprev=permerror reason=\"DNS record not found"),
        "{ar}"
    );
}

#[tokio::test]
async fn spf_mail_from_and_helo() {
    let Some(f) = Fixture::new() else { return };
    let c = &f.checker;
    let helo = "mail.sender.test";

    let o = c.spf(ip(GOOD_IP), helo, Some("alice@sender.test")).await;
    assert_eq!(
        (o.result, o.identity, o.domain.as_str()),
        (AuthResult::Pass, SpfIdentity::MailFrom, "sender.test")
    );
    let o = c.spf(ip(GOOD_IP6), helo, Some("<alice@sender.test>")).await;
    assert_eq!(o.result, AuthResult::Pass, "{o:?}");
    let o = c.spf(ip(BAD_IP), helo, Some("alice@sender.test")).await;
    assert_eq!(o.result, AuthResult::Fail, "{o:?}");
    let o = c.spf(ip(BAD_IP), helo, Some("x@soft.test")).await;
    assert_eq!(o.result, AuthResult::SoftFail, "{o:?}");
    let o = c.spf(ip(GOOD_IP), helo, Some("x@nospf.test")).await;
    assert_eq!(o.result, AuthResult::None, "{o:?}");
    let o = c.spf(ip(GOOD_IP), helo, Some("x@broken.test")).await;
    assert_eq!(o.result, AuthResult::PermError, "{o:?}");
    let o = c.spf(ip(GOOD_IP), helo, Some("x@nxdomain.test")).await;
    assert_eq!(o.result, AuthResult::None, "{o:?}");

    // Null reverse-path: the HELO identity ("mail.sender.test": v=spf1 a -all).
    for null in [None, Some(""), Some("<>")] {
        let o = c.spf(ip(GOOD_IP), helo, null).await;
        assert_eq!(
            (o.result, o.identity, o.domain.as_str()),
            (AuthResult::Pass, SpfIdentity::Helo, "mail.sender.test"),
            "{null:?}"
        );
    }
    let o = c.spf(ip(BAD_IP), helo, None).await;
    assert_eq!(
        (o.result, o.identity),
        (AuthResult::Fail, SpfIdentity::Helo)
    );
    let o = c.spf(ip(GOOD_IP), "[192.0.2.10]", None).await;
    assert_eq!(o.result, AuthResult::None, "address literal HELO: {o:?}");

    // A hostile HELO or MAIL FROM is checked as what it is and cannot break the header.
    let evil_helo = "mail.sender.test\r\nX-Injected: 1; spf=pass";
    let o = c.spf(ip(BAD_IP), evil_helo, None).await;
    assert_eq!(o.result, AuthResult::None, "{o:?}");
    let iprev = c.iprev(ip(BAD_IP)).await;
    let ar = c.authentication_results(&iprev, &o, None);
    assert!(!ar.contains("\r\nX-Injected"), "{ar}");
    assert!(
        unfold(&ar).contains("spf=none smtp.helo=\"mail.sender.testX-Injected: 1; spf=pass\"\r\n"),
        "{ar}"
    );
    let evil_from = "a@sender.test>\r\nX-Injected: 1";
    let o = c
        .spf(ip(GOOD_IP), "mail.sender.test", Some(evil_from))
        .await;
    assert_ne!(o.result, AuthResult::Pass, "{o:?}");
    let ar = c.authentication_results(&iprev, &o, None);
    assert!(!ar.contains("\r\nX-Injected"), "{ar}");
    let lines: Vec<&str> = ar.trim_end_matches("\r\n").split("\r\n").collect();
    assert!(lines[1..].iter().all(|l| l.starts_with('\t')), "{ar}");

    let iprev = c.iprev(ip(BAD_IP)).await;
    let o = c.spf(ip(BAD_IP), helo, None).await;
    let ar = c.authentication_results(&iprev, &o, None);
    assert!(ar.contains("spf=fail smtp.helo=mail.sender.test"), "{ar}");
}

#[tokio::test]
async fn dkim_rsa_and_ed25519_pass_and_dmarc_passes_by_dkim_alignment() {
    let Some(f) = Fixture::new() else { return };
    let raw = message("alice@sender.test", "signed", "Hello.\r\n");
    let signed = f.rsa.sign(&raw);
    let signed_twice = f.ed.sign(&signed);

    // From a client SPF fails for: DMARC passes through the aligned DKIM signature.
    let (spf, msg, ar) = f
        .run(&signed_twice, BAD_IP, Some("alice@sender.test"))
        .await;
    assert_eq!(spf.result, AuthResult::Fail);
    assert_eq!(msg.dkim.len(), 2, "{msg:?}");
    for d in &msg.dkim {
        assert_eq!(d.result, AuthResult::Pass, "{d:?}");
        assert_eq!(d.domain.as_deref(), Some("sender.test"));
    }
    let algs: Vec<_> = msg.dkim.iter().map(|d| d.algorithm.unwrap()).collect();
    assert!(algs.contains(&"rsa-sha256") && algs.contains(&"ed25519-sha256"));
    assert_eq!(msg.dmarc.result, AuthResult::Pass, "{msg:?}");
    assert!(msg.dmarc.dkim_aligned && !msg.dmarc.spf_aligned);
    assert_eq!(msg.dmarc.header_from.as_deref(), Some("sender.test"));
    assert!(!msg.dmarc_reject() && !msg.dmarc_quarantine());
    assert_eq!(msg.arc.as_ref().unwrap().result, AuthResult::None);

    let u = unfold(&ar);
    assert!(
        ar.starts_with("Authentication-Results: mx.ringmail.test;\r\n"),
        "{ar}"
    );
    assert!(u.contains("iprev=permerror"), "{ar}");
    assert!(
        u.contains("spf=fail smtp.mailfrom=alice@sender.test"),
        "{ar}"
    );
    assert!(
        u.contains("dkim=pass header.d=sender.test header.s=rsa header.a=rsa-sha256 header.b="),
        "{ar}"
    );
    assert!(
        u.contains("dkim=pass header.d=sender.test header.s=ed header.a=ed25519-sha256"),
        "{ar}"
    );
    assert!(
        u.contains("dmarc=pass (p=none) header.from=sender.test"),
        "{ar}"
    );
    assert!(u.ends_with("arc=none\r\n"), "{ar}");

    // The same message from the legitimate client: SPF aligned too.
    let (_, msg, _) = f.run(&signed, GOOD_IP, Some("bounce@sender.test")).await;
    assert!(msg.dmarc.spf_aligned && msg.dmarc.dkim_aligned, "{msg:?}");
}

#[tokio::test]
async fn tampered_body_or_header_fails_dkim() {
    let Some(f) = Fixture::new() else { return };
    let raw = message("alice@sender.test", "orig", "Pay 10 EUR.\r\n");
    for key in [&f.rsa, &f.ed] {
        let signed = key.sign(&raw);
        let body = replace(&signed, "Pay 10 EUR.", "Pay 9999 EUR.");
        let header = replace(&signed, "Subject: orig", "Subject: changed");
        for (what, m) in [("body", body), ("header", header)] {
            let (_, msg, ar) = f.run(&m, BAD_IP, Some("alice@sender.test")).await;
            assert_eq!(msg.dkim.len(), 1);
            assert_eq!(msg.dkim[0].result, AuthResult::Fail, "{what}: {msg:?}");
            assert!(unfold(&ar).contains("dkim=fail reason="), "{ar}");
            // sender.test publishes p=none: DMARC fails without a disposition.
            assert_eq!(msg.dmarc.result, AuthResult::Fail);
            assert_eq!(msg.dmarc.policy, DmarcPolicy::None);
            assert!(!msg.dmarc_reject() && !msg.dmarc_quarantine());
        }
    }
}

#[tokio::test]
async fn dmarc_reject_and_quarantine() {
    let Some(f) = Fixture::new() else { return };
    // Unsigned, SPF fail: reject.
    let raw = message("bob@reject.test", "forged", "Hi.\r\n");
    let (spf, msg, ar) = f.run(&raw, BAD_IP, Some("bob@reject.test")).await;
    assert_eq!(spf.result, AuthResult::Fail);
    assert!(msg.dkim.is_empty());
    assert_eq!(msg.dmarc.result, AuthResult::Fail, "{msg:?}");
    assert_eq!(msg.dmarc.policy, DmarcPolicy::Reject);
    assert!(msg.dmarc_reject() && !msg.dmarc_quarantine());
    let u = unfold(&ar);
    assert!(u.contains("dkim=none;"), "{ar}");
    assert!(
        u.contains("dmarc=fail reason=\"Policy not aligned\" (p=reject) header.from=reject.test"),
        "{ar}"
    );

    // SPF passes for another domain (not aligned), signature by another domain: reject.
    let signed_by_other = f.rsa.sign(&raw);
    let (_, msg, _) = f
        .run(&signed_by_other, GOOD_IP, Some("bounce@sender.test"))
        .await;
    assert_eq!(msg.dkim[0].result, AuthResult::Pass);
    assert!(msg.dmarc_reject(), "{msg:?}");

    // Signed by reject.test itself: passes although SPF fails.
    let signed = f.reject_key.sign(&raw);
    let (_, msg, _) = f.run(&signed, BAD_IP, Some("bob@reject.test")).await;
    assert_eq!(msg.dmarc.result, AuthResult::Pass, "{msg:?}");
    assert!(!msg.dmarc_reject());

    // ... but not once tampered with.
    let tampered = replace(&signed, "Hi.", "Hi, send money.");
    let (_, msg, _) = f.run(&tampered, BAD_IP, Some("bob@reject.test")).await;
    assert!(msg.dmarc_reject(), "{msg:?}");

    // rsa-sha1 is never valid (RFC 8301), so it cannot rescue DMARC either.
    let sha1 = f.reject_key.sign_with(&raw, "rsa-sha1");
    let (_, msg, ar) = f.run(&sha1, BAD_IP, Some("bob@reject.test")).await;
    assert_eq!(msg.dkim.len(), 1);
    assert_eq!(msg.dkim[0].result, AuthResult::PermError, "{msg:?}");
    assert_eq!(msg.dkim[0].algorithm, Some("rsa-sha1"));
    assert!(msg.dmarc_reject(), "{msg:?}");
    assert!(
        unfold(&ar).contains("dkim=permerror reason=\"rsa-sha1 is not accepted"),
        "{ar}"
    );

    // Unsigned from the authorized client: SPF alignment passes.
    let (_, msg, _) = f.run(&raw, GOOD_IP, Some("bob@reject.test")).await;
    assert_eq!(msg.dmarc.result, AuthResult::Pass, "{msg:?}");
    assert!(msg.dmarc.spf_aligned);

    // p=quarantine.
    let raw = message("eve@quarantine.test", "q", "Hi.\r\n");
    let (_, msg, ar) = f.run(&raw, BAD_IP, Some("eve@quarantine.test")).await;
    assert!(msg.dmarc_quarantine() && !msg.dmarc_reject(), "{msg:?}");
    assert!(
        unfold(&ar).contains("(p=quarantine) header.from=quarantine.test"),
        "{ar}"
    );

    // A From domain without a DMARC record: none.
    let raw = message("x@soft.test", "n", "Hi.\r\n");
    let (_, msg, ar) = f.run(&raw, BAD_IP, Some("x@soft.test")).await;
    assert_eq!(msg.dmarc.result, AuthResult::None, "{msg:?}");
    assert!(
        unfold(&ar).contains("dmarc=none header.from=soft.test"),
        "{ar}"
    );
}

#[tokio::test]
async fn large_messages_use_spf_alignment_only() {
    let Some(f) = Fixture::with_max(4096) else {
        return;
    };
    let body = "x".repeat(100).repeat(60).chars().collect::<String>() + "\r\n";
    let raw = message("bob@reject.test", "big", &body);
    let signed = f.reject_key.sign(&raw);
    assert!(signed.len() > 4096);

    // Signed and SPF fail: the signature is not looked at, so DMARC fails: reject.
    let (_, msg, ar) = f.run(&signed, BAD_IP, Some("bob@reject.test")).await;
    assert!(msg.too_large);
    assert_eq!(msg.dkim.len(), 1);
    assert_eq!(msg.dkim[0].result, AuthResult::Neutral);
    assert!(msg.arc.is_none());
    assert!(msg.dmarc_reject(), "{msg:?}");
    assert!(
        unfold(&ar).contains("dkim=neutral reason=\"message too large\""),
        "{ar}"
    );
    assert!(!unfold(&ar).contains(" arc="), "{ar}");

    // SPF pass and aligned: DMARC passes.
    let (_, msg, _) = f.run(&signed, GOOD_IP, Some("bob@reject.test")).await;
    assert_eq!(msg.dmarc.result, AuthResult::Pass, "{msg:?}");

    // The header-only entry point the MX uses for spooled messages.
    let headers = &signed[..signed.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4];
    let spf = f
        .checker
        .spf(ip(BAD_IP), "mail.sender.test", Some("bob@reject.test"))
        .await;
    let msg = f.checker.message_too_large(headers, &spf).await;
    assert!(msg.too_large && msg.dmarc_reject(), "{msg:?}");
}

#[tokio::test]
async fn arc_sealed_message_validates() {
    if !tools_available(&["arcsign"]) {
        return;
    }
    let Some(f) = Fixture::new() else { return };
    let raw = message("alice@sender.test", "arc", "Forwarded.\r\n");
    let mut with_ar =
        b"Authentication-Results: fwd.sender.test; spf=pass smtp.mailfrom=alice@sender.test\r\n"
            .to_vec();
    with_ar.extend_from_slice(&raw);
    let sealed = f.rsa.arc_seal(&with_ar, "fwd.sender.test");
    let (_, msg, ar) = f.run(&sealed, BAD_IP, Some("alice@sender.test")).await;
    let arc = msg.arc.as_ref().unwrap();
    assert_eq!(arc.result, AuthResult::Pass, "{msg:?}");
    assert_eq!(arc.instances, 1);
    assert!(ar.ends_with("arc=pass\r\n"), "{ar}");

    let broken = replace(&sealed, "Forwarded.", "Changed after sealing.");
    let (_, msg, ar) = f.run(&broken, BAD_IP, Some("alice@sender.test")).await;
    assert_eq!(
        msg.arc.as_ref().unwrap().result,
        AuthResult::Fail,
        "{msg:?}"
    );
    assert!(unfold(&ar).contains("arc=fail reason="), "{ar}");
}

#[tokio::test]
async fn unreachable_dns_is_temperror() {
    // A port nothing listens on: every query fails fast or times out.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = AuthConfig::new("mx.ringmail.test");
    cfg.nameserver = Some(([127, 0, 0, 1], port).into());
    cfg.timeout = Duration::from_millis(300);
    cfg.check_timeout = Duration::from_secs(5);
    let c = Checker::new(cfg).unwrap();
    let o = c.iprev(ip(GOOD_IP)).await;
    assert_eq!(o.result, AuthResult::TempError, "{o:?}");
    let o = c
        .spf(ip(GOOD_IP), "mail.sender.test", Some("a@sender.test"))
        .await;
    assert_eq!(o.result, AuthResult::TempError, "{o:?}");
    assert_eq!(o.domain, "sender.test");
}
