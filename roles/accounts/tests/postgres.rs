//! PostgreSQL store against a private cluster (skipped when PostgreSQL is not installed).

mod fixtures;

use fixtures::{PgCluster, hash};
use ringmail_accounts::postgres::PgStore;
use ringmail_accounts::{AccountError, AuthOutcome};

async fn seeded(cluster: &PgCluster) -> PgStore {
    let store = PgStore::connect(&cluster.url()).await.unwrap();
    store.domain_add("Example.TEST").await.unwrap();
    store
        .account_add("Alice@Example.test", &hash("alice-pw"), Some(1 << 30))
        .await
        .unwrap();
    store
        .account_add("bob@example.test", &hash("bob-pw"), None)
        .await
        .unwrap();
    store
        .account_add("carol@example.test", &hash("carol-pw"), None)
        .await
        .unwrap();
    store
        .set_disabled("carol@example.test", true)
        .await
        .unwrap();
    store
        .alias_add("postmaster@example.test", "alice@example.test")
        .await
        .unwrap();
    store
}

fn invalid<T: std::fmt::Debug>(r: Result<T, AccountError>) -> String {
    match r {
        Err(AccountError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn authenticate_and_resolve() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let store = seeded(&cluster).await;

    match store
        .authenticate("alice@example.test", "alice-pw")
        .await
        .unwrap()
    {
        AuthOutcome::Ok(a) => {
            assert_eq!(a.address, "alice@example.test");
            assert_eq!(a.aliases, vec!["postmaster@example.test".to_string()]);
            assert_eq!(a.quota_bytes, Some(1 << 30));
            assert!(!a.disabled);
        }
        other => panic!("{other:?}"),
    }
    // Login names are case-insensitive.
    assert!(matches!(
        store
            .authenticate("ALICE@example.TEST", "alice-pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
    for (user, pw) in [
        ("alice@example.test", "wrong"),
        ("alice@example.test", "ALICE-PW"),
        ("alice@example.test", ""),
        ("nobody@example.test", "alice-pw"),
        ("postmaster@example.test", "alice-pw"), // aliases are not login names
        ("not-an-address", "alice-pw"),
        ("", ""),
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
    // Disabled is only told to someone who knows the password.
    assert_eq!(
        store
            .authenticate("carol@example.test", "nope")
            .await
            .unwrap(),
        AuthOutcome::BadCredentials
    );

    // Lookups: account() is primary only, resolve() also follows aliases.
    assert!(
        store
            .account("postmaster@example.test")
            .await
            .unwrap()
            .is_none()
    );
    let via_alias = store
        .resolve("PostMaster@example.test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(via_alias.address, "alice@example.test");
    assert_eq!(
        store
            .resolve("bob@example.test")
            .await
            .unwrap()
            .unwrap()
            .address,
        "bob@example.test"
    );
    assert!(
        store
            .resolve("nobody@example.test")
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.resolve("garbage").await.unwrap().is_none());
    // "May alice send as postmaster@?": the resolved owner is alice.
    let owner = store
        .resolve("postmaster@example.test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.address, "alice@example.test");
    let bob = store.resolve("bob@example.test").await.unwrap().unwrap();
    assert!(!bob.aliases.contains(&"postmaster@example.test".to_string()));

    assert!(store.is_local_domain("EXAMPLE.test").await.unwrap());
    assert!(!store.is_local_domain("example.org").await.unwrap());

    // Password change.
    store
        .set_password("alice@example.test", &hash("new-pw"))
        .await
        .unwrap();
    assert_eq!(
        store
            .authenticate("alice@example.test", "alice-pw")
            .await
            .unwrap(),
        AuthOutcome::BadCredentials
    );
    assert!(matches!(
        store
            .authenticate("alice@example.test", "new-pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
    // Re-enable.
    store
        .set_disabled("carol@example.test", false)
        .await
        .unwrap();
    assert!(matches!(
        store
            .authenticate("carol@example.test", "carol-pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
    // Imported Dovecot-style hashes verify (here a SHA512-CRYPT of "bob-pw" made by openssl).
    let real = std::process::Command::new("openssl")
        .args(["passwd", "-6", "-salt", "ringmail", "bob-pw"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(crypt) = real {
        store
            .set_password("bob@example.test", &format!("{{SHA512-CRYPT}}{crypt}"))
            .await
            .unwrap();
        assert!(matches!(
            store
                .authenticate("bob@example.test", "bob-pw")
                .await
                .unwrap(),
            AuthOutcome::Ok(_)
        ));
        assert_eq!(
            store
                .authenticate("bob@example.test", "wrong")
                .await
                .unwrap(),
            AuthOutcome::BadCredentials
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_operations() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let store = seeded(&cluster).await;

    // Domains.
    store.domain_add("example.org").await.unwrap();
    invalid(store.domain_add("example.org").await);
    invalid(store.domain_add("bad@domain").await);
    assert_eq!(
        store.domain_list().await.unwrap(),
        vec!["example.org".to_string(), "example.test".to_string()]
    );
    // Accounts: FK to domains, duplicates, bad syntax.
    assert!(
        invalid(store.account_add("x@unknown.test", &hash("x"), None).await).contains("domain")
    );
    invalid(
        store
            .account_add("bob@example.test", &hash("x"), None)
            .await,
    );
    invalid(
        store
            .account_add("BOB@example.test", &hash("x"), None)
            .await,
    );
    invalid(store.account_add("no-at-sign", &hash("x"), None).await);
    invalid(
        store
            .account_add("postmaster@example.test", &hash("x"), None)
            .await,
    );
    invalid(
        store
            .account_add("q@example.org", &hash("x"), Some(u64::MAX))
            .await,
    );
    store
        .account_add("dave@example.org", &hash("dave-pw"), Some(5))
        .await
        .unwrap();
    let all = store.account_list(None).await.unwrap();
    let addrs: Vec<_> = all.iter().map(|a| a.address.as_str()).collect();
    assert_eq!(
        addrs,
        [
            "alice@example.test",
            "bob@example.test",
            "carol@example.test",
            "dave@example.org"
        ]
    );
    assert!(all[2].disabled);
    assert_eq!(all[0].aliases, vec!["postmaster@example.test".to_string()]);
    let org = store.account_list(Some("example.org")).await.unwrap();
    assert_eq!(org.len(), 1);
    assert_eq!(org[0].quota_bytes, Some(5));

    // Aliases: target must exist, alias domain must be local, alias cannot shadow an account.
    invalid(
        store
            .alias_add("x@example.test", "nobody@example.test")
            .await,
    );
    invalid(
        store
            .alias_add("x@elsewhere.test", "bob@example.test")
            .await,
    );
    invalid(
        store
            .alias_add("bob@example.test", "alice@example.test")
            .await,
    );
    invalid(
        store
            .alias_add("postmaster@example.test", "bob@example.test")
            .await,
    );
    store
        .alias_add("sales@example.org", "bob@example.test")
        .await
        .unwrap();
    store
        .alias_add("info@example.test", "dave@example.org")
        .await
        .unwrap();
    assert_eq!(
        store.alias_list(None).await.unwrap(),
        vec![
            (
                "info@example.test".to_string(),
                "dave@example.org".to_string()
            ),
            (
                "postmaster@example.test".to_string(),
                "alice@example.test".to_string()
            ),
            (
                "sales@example.org".to_string(),
                "bob@example.test".to_string()
            ),
        ]
    );
    assert_eq!(
        store.alias_list(Some("example.org")).await.unwrap(),
        vec![(
            "sales@example.org".to_string(),
            "bob@example.test".to_string()
        )]
    );
    store.alias_del("sales@example.org").await.unwrap();
    invalid(store.alias_del("sales@example.org").await);

    // domain_del refuses while accounts or aliases remain.
    assert!(invalid(store.domain_del("example.org").await).contains("accounts"));
    invalid(store.domain_del("nowhere.test").await);
    // Deleting an account cascades to its aliases.
    store.account_del("dave@example.org").await.unwrap();
    assert!(store.resolve("info@example.test").await.unwrap().is_none());
    assert_eq!(store.alias_list(None).await.unwrap().len(), 1);
    invalid(store.account_del("dave@example.org").await);
    invalid(store.set_password("dave@example.org", &hash("x")).await);
    invalid(store.set_disabled("dave@example.org", true).await);
    store.domain_del("example.org").await.unwrap();
    assert_eq!(
        store.domain_list().await.unwrap(),
        vec!["example.test".to_string()]
    );
    store
        .alias_add("x@example.test", "bob@example.test")
        .await
        .unwrap();
    for a in ["alice", "bob", "carol"] {
        store
            .account_del(&format!("{a}@example.test"))
            .await
            .unwrap();
    }
    store.domain_del("example.test").await.unwrap();
    assert!(store.domain_list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_connect_migrates_once_and_persists() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let url = cluster.url();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { PgStore::connect(&url).await }));
    }
    let stores: Vec<PgStore> = futures_join(tasks).await;
    stores[0].domain_add("example.test").await.unwrap();
    assert!(stores[5].is_local_domain("example.test").await.unwrap());
    drop(stores);
    // A later start finds the schema in place.
    let again = PgStore::connect(&url).await.unwrap();
    assert_eq!(
        again.domain_list().await.unwrap(),
        vec!["example.test".to_string()]
    );
}

async fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<Result<PgStore, AccountError>>>,
) -> Vec<PgStore> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn unavailable() {
    // Nothing listening.
    let port = fixtures::closed_port();
    match PgStore::connect(&format!("postgres://u:p@127.0.0.1:{port}/db")).await {
        Err(AccountError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        PgStore::connect("postgres://u:p@127.0.0.1:notaport/db").await,
        Err(AccountError::Config(_))
    ));

    let Some(mut cluster) = PgCluster::start() else {
        return;
    };
    let store = seeded(&cluster).await;
    assert!(store.resolve("bob@example.test").await.unwrap().is_some());
    cluster.stop();
    match store.authenticate("bob@example.test", "bob-pw").await {
        Err(AccountError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
    match store.resolve("bob@example.test").await {
        Err(AccountError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_url() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let url = format!(
        "host={} port={} user=ringmail password=ringmail-test dbname=ringmail",
        cluster.socket_dir().display(),
        cluster.port
    );
    let store = PgStore::connect(&url).await.unwrap();
    store.domain_add("example.test").await.unwrap();
    assert!(store.is_local_domain("example.test").await.unwrap());
}
