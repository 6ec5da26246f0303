//! LDAP store against a private slapd with StartTLS (skipped when slapd is not installed).

mod fixtures;

use fixtures::Slapd;
use ringmail_accounts::ldap::LdapStore;
use ringmail_accounts::{AccountError, AuthOutcome};

async fn store(slapd: &Slapd) -> LdapStore {
    LdapStore::connect(&slapd.url()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn authenticate_lookup_and_read_only() {
    let Some(slapd) = Slapd::start() else {
        return;
    };
    let store = store(&slapd).await;

    match store
        .authenticate("Alice@Example.test", "alice-pw")
        .await
        .unwrap()
    {
        AuthOutcome::Ok(a) => {
            assert_eq!(a.address, "alice@example.test");
            assert_eq!(
                a.aliases,
                vec![
                    "al@example.test".to_string(),
                    "postmaster@example.test".to_string()
                ]
            );
            assert!(!a.disabled);
            assert_eq!(a.quota_bytes, None);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store
            .authenticate("bob@example.test", "bob-pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
    for (user, pw) in [
        ("alice@example.test", "wrong"),
        ("alice@example.test", "bob-pw"),
        ("alice@example.test", ""), // would be an unauthenticated bind
        ("nobody@example.test", "alice-pw"),
        ("nobody@example.test", ""),
        ("bogus", "alice-pw"),
    ] {
        assert_eq!(
            store.authenticate(user, pw).await.unwrap(),
            AuthOutcome::BadCredentials,
            "{user}"
        );
    }
    assert_eq!(
        store
            .authenticate("carol@example.test", "carol-pw")
            .await
            .unwrap(),
        AuthOutcome::Disabled
    );
    assert_eq!(
        store.authenticate("carol@example.test", "x").await.unwrap(),
        AuthOutcome::BadCredentials
    );

    // No stored secret to hand out (SCRAM): login is by bind.
    assert!(matches!(
        store.stored_password("alice@example.test").await,
        Err(AccountError::ReadOnly(_))
    ));
    let facade = ringmail_accounts::Accounts::open(&slapd.url())
        .await
        .unwrap();
    assert!(!facade.holds_secrets());
    assert!(matches!(
        facade.scram_secret("alice@example.test").await,
        Err(AccountError::ReadOnly(_))
    ));

    // account(): primary addresses only; resolve(): aliases too.
    let alice = store.account("alice@example.test").await.unwrap().unwrap();
    assert_eq!(alice.address, "alice@example.test");
    assert!(
        store
            .account("postmaster@example.test")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .account("nobody@example.test")
            .await
            .unwrap()
            .is_none()
    );
    let owner = store
        .resolve("PostMaster@example.test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.address, "alice@example.test");
    assert!(
        owner
            .aliases
            .contains(&"postmaster@example.test".to_string())
    );
    assert_eq!(
        store
            .resolve("al@example.test")
            .await
            .unwrap()
            .unwrap()
            .address,
        "alice@example.test"
    );
    let carol = store.resolve("carol@example.test").await.unwrap().unwrap();
    assert!(carol.disabled);
    assert!(
        store
            .resolve("nobody@example.test")
            .await
            .unwrap()
            .is_none()
    );
    // bob does not own alice's alias.
    let bob = store.resolve("bob@example.test").await.unwrap().unwrap();
    assert!(bob.aliases.is_empty());

    // Domains come from the URL.
    assert!(store.is_local_domain("EXAMPLE.test").await.unwrap());
    assert!(store.is_local_domain("example.org").await.unwrap());
    assert!(!store.is_local_domain("example.net").await.unwrap());
    assert_eq!(
        store.domain_list().await.unwrap(),
        vec!["example.org".to_string(), "example.test".to_string()]
    );

    // Listings.
    let all: Vec<String> = store
        .account_list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.address)
        .collect();
    assert_eq!(
        all,
        [
            "admin@example.test",
            "alice@example.test",
            "bob@example.test",
            "carol@example.test"
        ]
    );
    assert!(
        store
            .account_list(Some("example.org"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.alias_list(Some("example.test")).await.unwrap(),
        vec![
            (
                "al@example.test".to_string(),
                "alice@example.test".to_string()
            ),
            (
                "postmaster@example.test".to_string(),
                "alice@example.test".to_string()
            ),
        ]
    );

    // Writes are refused.
    let ro = |r: Result<(), AccountError>| assert!(matches!(r, Err(AccountError::ReadOnly(_))));
    ro(store.domain_add("example.net").await);
    ro(store.domain_del("example.test").await);
    ro(store
        .account_add("x@example.test", "{ARGON2ID}x", None)
        .await);
    ro(store.account_del("bob@example.test").await);
    ro(store.set_password("bob@example.test", "{ARGON2ID}x").await);
    ro(store.set_disabled("bob@example.test", true).await);
    ro(store.alias_add("x@example.test", "bob@example.test").await);
    ro(store.alias_del("al@example.test").await);
}

/// RFC 4515: filter metacharacters in the login name must not widen the search.
#[tokio::test(flavor = "multi_thread")]
async fn filter_injection_is_inert() {
    let Some(slapd) = Slapd::start() else {
        return;
    };
    let store = store(&slapd).await;
    let attempts = [
        "*)(uid=*))(|(uid=*@example.test",
        "*)(uid=*))(|(uid=*",
        "admin*@example.test",
        "admin*",
        "*@example.test",
        "*",
        "a*@example.test",
        "alice@example.test)(mail=*",
        "alice@example.test)(|(mail=*)",
        "*)(objectClass=*",
        "bob@example.test\\2a",
        "bob@example.tes\0t",
        "(mail=bob@example.test)@example.test",
    ];
    for attempt in attempts {
        for pw in ["alice-pw", "bob-pw", "admin-pw", "service-secret", "*"] {
            assert_eq!(
                store.authenticate(attempt, pw).await.unwrap(),
                AuthOutcome::BadCredentials,
                "{attempt:?} / {pw}"
            );
        }
        assert!(
            store.account(attempt).await.unwrap().is_none(),
            "{attempt:?}"
        );
        assert!(
            store.resolve(attempt).await.unwrap().is_none(),
            "{attempt:?}"
        );
    }
    // The real names still work after all that.
    assert!(matches!(
        store
            .authenticate("admin@example.test", "admin-pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_service_bind_failures() {
    let Some(slapd) = Slapd::start() else {
        return;
    };
    // Wrong service password: the store is unusable (operator error), reported as such.
    let url = slapd.url().replace("service-secret", "wrong");
    assert!(matches!(
        LdapStore::connect(&url).await,
        Err(AccountError::Unavailable(_))
    ));
    // StartTLS against a CA that did not sign the server certificate fails.
    let other_ca =
        std::env::temp_dir().join(format!("ringmail-other-ca-{}.pem", std::process::id()));
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, params.self_signed(&key).unwrap().pem()).unwrap();
    let url = slapd.url().replace(
        &slapd.ca_file.display().to_string(),
        &other_ca.display().to_string(),
    );
    let r = LdapStore::connect(&url).await;
    let _ = std::fs::remove_file(&other_ca);
    assert!(matches!(r, Err(AccountError::Unavailable(_))), "{r:?}");
    // Anonymous lookups (no service account) still find users under the default ACL.
    let url = slapd.url().replace(
        &format!("&bind_dn={}&bind_password=service-secret", fixtures::SVC_DN),
        "",
    );
    let anon = LdapStore::connect(&url).await.unwrap();
    assert!(matches!(
        anon.authenticate("bob@example.test", "bob-pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn unavailable() {
    let port = fixtures::closed_port();
    let url = format!("ldap://127.0.0.1:{port}/?base=dc=example,dc=test&timeout=2");
    assert!(matches!(
        LdapStore::connect(&url).await,
        Err(AccountError::Unavailable(_))
    ));

    let Some(mut slapd) = Slapd::start() else {
        return;
    };
    let store = store(&slapd).await;
    assert!(store.resolve("bob@example.test").await.unwrap().is_some());
    slapd.stop();
    match store.resolve("bob@example.test").await {
        Err(AccountError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
    match store.authenticate("bob@example.test", "bob-pw").await {
        Err(AccountError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
}
