//! End-to-end tests: SQLite in a temporary directory, the cache with a counting store.

use std::sync::Arc;
use std::time::Duration;

use crate::fake::{Counts, FakeStore};
use crate::{AccountError, Accounts, AuthOutcome, Store, sqlite::SqliteStore};

fn url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}/sub/dir/accounts.db", dir.path().display())
}

async fn populated(dir: &tempfile::TempDir) -> Accounts {
    let a = Accounts::open(&url(dir)).await.unwrap();
    a.domain_add("Example.org").await.unwrap();
    a.account_add("Alice@Example.org", "alice pw", Some(1 << 30))
        .await
        .unwrap();
    a.account_add("bob@example.org", "bob pw", None)
        .await
        .unwrap();
    a.alias_add("postmaster@example.org", "alice@example.org")
        .await
        .unwrap();
    a
}

fn invalid<T: std::fmt::Debug>(r: Result<T, AccountError>) {
    assert!(matches!(r, Err(AccountError::Invalid(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_created_on_first_use_and_migrations_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    {
        let a = populated(&dir).await;
        assert_eq!(a.kind(), "sqlite");
    }
    assert!(dir.path().join("sub/dir/accounts.db").exists());
    // Reopen twice: data kept, one schema_version row.
    for _ in 0..2 {
        let a = Accounts::open(&url(&dir)).await.unwrap();
        assert_eq!(a.domain_list().await.unwrap(), vec!["example.org"]);
        assert_eq!(a.account_list(None).await.unwrap().len(), 2);
    }
    let path = dir.path().join("sub/dir/accounts.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (n, v): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), MAX(version) FROM schema_version",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((n, v), (1, 1));
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // A newer schema than this build knows is refused.
    conn.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(conn);
    let r = Accounts::open(&url(&dir)).await;
    assert!(matches!(r, Err(AccountError::Config(_))), "{r:?}");
}

#[tokio::test]
async fn open_url_schemes() {
    for u in ["mysql://x", "sqlite:", "ldap://127.0.0.1:1/"] {
        assert!(
            matches!(Accounts::open(u).await, Err(AccountError::Config(_))),
            "{u}"
        );
    }
    // Well-formed, but nothing listens: the store is unavailable, not misconfigured.
    for u in [
        "postgres://u@127.0.0.1:1/db",
        "ldap://127.0.0.1:1/?base=dc=example,dc=test",
    ] {
        let r = Accounts::open(u).await;
        assert!(
            matches!(r, Err(AccountError::Unavailable(_))),
            "{u}: {:?}",
            r.err()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_admin_operations() {
    let dir = tempfile::tempdir().unwrap();
    let a = populated(&dir).await;

    assert!(a.is_local_domain("EXAMPLE.org").await.unwrap());
    assert!(!a.is_local_domain("example.net").await.unwrap());
    assert!(!a.is_local_domain("bad domain").await.unwrap());
    invalid(a.domain_add("example.org").await);
    a.domain_add("example.net").await.unwrap();
    assert_eq!(
        a.domain_list().await.unwrap(),
        vec!["example.net", "example.org"]
    );

    let alice = a.account("alice@example.org").await.unwrap().unwrap();
    assert_eq!(alice.address, "alice@example.org");
    assert_eq!(alice.aliases, vec!["postmaster@example.org"]);
    assert_eq!(alice.quota_bytes, Some(1 << 30));
    assert!(!alice.disabled);
    assert!(a.account("postmaster@example.org").await.unwrap().is_none());

    // Duplicates and collisions.
    invalid(a.account_add("alice@example.org", "x", None).await);
    invalid(a.account_add("postmaster@example.org", "x", None).await);
    invalid(a.alias_add("bob@example.org", "alice@example.org").await);
    invalid(
        a.alias_add("postmaster@example.org", "bob@example.org")
            .await,
    );
    // Foreign keys and local domains.
    invalid(a.account_add("carol@unknown.org", "x", None).await);
    invalid(a.alias_add("x@example.org", "nobody@example.org").await);
    invalid(a.alias_add("x@unknown.org", "alice@example.org").await);
    invalid(a.account_add("not an address", "x", None).await);
    invalid(a.account_add("c@example.org", "", None).await);
    invalid(a.account_add("c@example.org", "a\nb", None).await);
    invalid(a.account_add_hashed("c@example.org", "{MD5}x", None).await);
    invalid(a.domain_del("example.org").await);
    invalid(a.domain_del("nope.org").await);

    // Aliases across domains; lists filtered by domain.
    a.account_add("carol@example.net", "carol pw", Some(5))
        .await
        .unwrap();
    a.alias_add("c@example.org", "Carol@example.net")
        .await
        .unwrap();
    a.alias_add("abuse@example.org", "alice@example.org")
        .await
        .unwrap();
    assert_eq!(
        a.alias_list(Some("example.org")).await.unwrap(),
        vec![
            ("abuse@example.org".into(), "alice@example.org".into()),
            ("c@example.org".into(), "carol@example.net".into()),
            ("postmaster@example.org".into(), "alice@example.org".into()),
        ]
    );
    assert!(a.alias_list(Some("example.net")).await.unwrap().is_empty());
    assert_eq!(a.alias_list(None).await.unwrap().len(), 3);
    let net = a.account_list(Some("example.net")).await.unwrap();
    assert_eq!(net.len(), 1);
    assert_eq!(net[0].aliases, vec!["c@example.org"]);
    assert_eq!(a.account_list(Some("example.org")).await.unwrap().len(), 2);

    // Aliases keep a domain alive, like accounts do.
    a.account_del("carol@example.net").await.unwrap();
    // Cascade: carol's alias went with her.
    assert_eq!(a.alias_list(None).await.unwrap().len(), 2);
    a.domain_del("example.net").await.unwrap();
    invalid(a.account_del("carol@example.net").await);

    a.alias_del("abuse@example.org").await.unwrap();
    invalid(a.alias_del("abuse@example.org").await);

    // Passwords and disabling.
    a.set_password("bob@example.org", "new bob pw")
        .await
        .unwrap();
    assert!(matches!(
        a.authenticate("bob@example.org", "bob pw").await.unwrap(),
        AuthOutcome::BadCredentials
    ));
    assert!(matches!(
        a.authenticate("bob@example.org", "new bob pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
    invalid(a.set_password("nobody@example.org", "x").await);
    a.set_disabled("bob@example.org", true).await.unwrap();
    assert!(
        a.account("bob@example.org")
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    invalid(a.set_disabled("nobody@example.org", true).await);
    // A Dovecot hash imports as is.
    a.set_password_hashed(
        "bob@example.org",
        "{SHA512-CRYPT}$6$Zf5Lk3mQ$AjFc1ITR63uxGwXk0izbcucl.HKqML4MBMNUXRMB4PzPkexW9lXu4RJI/kB2CAbuUjibF9cDobkfKWLHWAvFP.",
    )
    .await
    .unwrap();
    a.set_disabled("bob@example.org", false).await.unwrap();
    assert!(matches!(
        a.authenticate("BOB@example.org", "correct horse")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));

    // Quota above i64::MAX cannot be stored.
    invalid(a.account_add("big@example.org", "x", Some(u64::MAX)).await);
    // Every account gone: the domain can go.
    a.account_del("alice@example.org").await.unwrap();
    a.account_del("bob@example.org").await.unwrap();
    assert!(a.alias_list(None).await.unwrap().is_empty());
    a.domain_del("example.org").await.unwrap();
    assert!(a.domain_list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_authenticate_resolve_owns() {
    let dir = tempfile::tempdir().unwrap();
    let a = populated(&dir).await;
    let ok = a
        .authenticate(" ALICE@example.ORG ", "alice pw")
        .await
        .unwrap();
    let AuthOutcome::Ok(alice) = ok else {
        panic!("{ok:?}")
    };
    assert_eq!(alice.address, "alice@example.org");
    for (u, p) in [
        ("alice@example.org", "bob pw"),
        ("alice@example.org", "alice pw "),
        ("alice@example.org", ""),
        ("nobody@example.org", "alice pw"),
        ("postmaster@example.org", "alice pw"),
        ("alice@example.org\r\n", "x"),
        ("alice", "alice pw"),
    ] {
        assert_eq!(
            a.authenticate(u, p).await.unwrap(),
            AuthOutcome::BadCredentials,
            "{u:?}"
        );
    }
    a.set_disabled("alice@example.org", true).await.unwrap();
    assert_eq!(
        a.authenticate("alice@example.org", "alice pw")
            .await
            .unwrap(),
        AuthOutcome::Disabled
    );
    assert_eq!(
        a.authenticate("alice@example.org", "wrong").await.unwrap(),
        AuthOutcome::BadCredentials
    );
    a.set_disabled("alice@example.org", false).await.unwrap();

    let r = a.resolve("PostMaster@Example.org").await.unwrap().unwrap();
    assert_eq!(r.address, "alice@example.org");
    assert_eq!(
        a.resolve("bob@example.org").await.unwrap().unwrap().address,
        "bob@example.org"
    );
    assert!(a.resolve("nobody@example.org").await.unwrap().is_none());
    assert!(a.resolve("bad\0addr@example.org").await.unwrap().is_none());

    assert!(a.owns(&alice, "alice@example.org").await);
    assert!(a.owns(&alice, "POSTMASTER@example.org").await);
    assert!(!a.owns(&alice, "bob@example.org").await);
    assert!(!a.owns(&alice, "nobody@example.org").await);
    assert!(!a.owns(&alice, "garbage").await);
    // An alias added after `alice` was fetched is owned too (the write cleared the cache).
    a.alias_add("hostmaster@example.org", "alice@example.org")
        .await
        .unwrap();
    assert!(a.owns(&alice, "hostmaster@example.org").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_logins() {
    let dir = tempfile::tempdir().unwrap();
    let a = populated(&dir).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            // Distinct passwords defeat the login cache, so every attempt reaches SQLite.
            let (user, pw, want_ok) = match i % 4 {
                0 => ("alice@example.org", "alice pw".to_string(), true),
                1 => ("bob@example.org", "bob pw".to_string(), true),
                2 => ("bob@example.org", format!("wrong {i}"), false),
                _ => ("nobody@example.org", format!("x {i}"), false),
            };
            let out = a.authenticate(user, &pw).await.unwrap();
            assert_eq!(matches!(out, AuthOutcome::Ok(_)), want_ok, "{i}");
            let direct = match a.store() {
                Store::Sqlite(s) => s.authenticate(user, &pw).await.unwrap(),
                _ => unreachable!(),
            };
            assert_eq!(matches!(direct, AuthOutcome::Ok(_)), want_ok, "{i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn counted(dir: &tempfile::TempDir) -> (Accounts, Arc<Counts>) {
    let inner = SqliteStore::open(dir.path().join("c.db")).await.unwrap();
    let counts = Arc::new(Counts::default());
    let a = Accounts::new(Store::Fake(FakeStore {
        inner,
        counts: counts.clone(),
    }));
    a.domain_add("example.org").await.unwrap();
    a.account_add("alice@example.org", "alice pw", None)
        .await
        .unwrap();
    a.alias_add("info@example.org", "alice@example.org")
        .await
        .unwrap();
    (a, counts)
}

#[tokio::test(start_paused = true)]
async fn cache_resolve_positive_and_negative() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = counted(&dir).await;
    for _ in 0..5 {
        assert!(a.resolve("info@example.org").await.unwrap().is_some());
        assert!(a.resolve("INFO@example.org").await.unwrap().is_some());
        assert!(a.resolve("nobody@example.org").await.unwrap().is_none());
    }
    assert_eq!(c.get().2, 2);
    // The negative entry expires first.
    tokio::time::advance(Duration::from_secs(11)).await;
    a.resolve("info@example.org").await.unwrap();
    a.resolve("nobody@example.org").await.unwrap();
    assert_eq!(c.get().2, 3);
    tokio::time::advance(Duration::from_secs(20)).await;
    a.resolve("info@example.org").await.unwrap();
    assert_eq!(c.get().2, 4);
    // An admin write invalidates.
    a.alias_del("info@example.org").await.unwrap();
    assert!(a.resolve("info@example.org").await.unwrap().is_none());
    assert_eq!(c.get().2, 5);
}

#[tokio::test(start_paused = true)]
async fn cache_logins() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = counted(&dir).await;
    for _ in 0..10 {
        assert!(matches!(
            a.authenticate("alice@example.org", "alice pw")
                .await
                .unwrap(),
            AuthOutcome::Ok(_)
        ));
    }
    assert_eq!(c.get().0, 1);
    // A different password is never answered from the cache.
    assert_eq!(
        a.authenticate("alice@example.org", "guess").await.unwrap(),
        AuthOutcome::BadCredentials
    );
    assert_eq!(c.get().0, 2);
    // The same wrong password again (a client retrying) is.
    a.authenticate("alice@example.org", "guess").await.unwrap();
    assert_eq!(c.get().0, 2);
    // A flood for an unknown user reaches the store once.
    for i in 0..100 {
        assert_eq!(
            a.authenticate("nobody@example.org", &format!("pw{i}"))
                .await
                .unwrap(),
            AuthOutcome::BadCredentials
        );
    }
    assert_eq!(c.get().0, 3);
    assert_eq!(c.get().1, 2); // one existence check per failing user
    // Expiry.
    tokio::time::advance(Duration::from_secs(31)).await;
    a.authenticate("alice@example.org", "alice pw")
        .await
        .unwrap();
    a.authenticate("nobody@example.org", "pw").await.unwrap();
    assert_eq!(c.get().0, 5);
    // A password change through the facade takes effect at once.
    a.set_password("alice@example.org", "new pw").await.unwrap();
    assert_eq!(
        a.authenticate("alice@example.org", "alice pw")
            .await
            .unwrap(),
        AuthOutcome::BadCredentials
    );
    // So does disabling.
    a.set_password("alice@example.org", "alice pw")
        .await
        .unwrap();
    a.authenticate("alice@example.org", "alice pw")
        .await
        .unwrap();
    a.set_disabled("alice@example.org", true).await.unwrap();
    assert_eq!(
        a.authenticate("alice@example.org", "alice pw")
            .await
            .unwrap(),
        AuthOutcome::Disabled
    );
    // And a new account is seen even though its address was cached as unknown.
    a.authenticate("new@example.org", "pw").await.unwrap();
    a.account_add("new@example.org", "pw", None).await.unwrap();
    assert!(matches!(
        a.authenticate("new@example.org", "pw").await.unwrap(),
        AuthOutcome::Ok(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_secrets_stored_looked_up_and_verified_by_plain() {
    use crate::{PasswordScheme, scram};
    let dir = tempfile::tempdir().unwrap();
    let a = populated(&dir).await;
    let scheme = PasswordScheme::ScramSha256 { iterations: 5000 };
    a.account_add_with("carol@example.org", "carol pw", None, scheme)
        .await
        .unwrap();
    // PLAIN/LOGIN verify against the SCRAM secret.
    assert!(matches!(
        a.authenticate("carol@example.org", "carol pw")
            .await
            .unwrap(),
        AuthOutcome::Ok(_)
    ));
    assert_eq!(
        a.authenticate("carol@example.org", "carol pW")
            .await
            .unwrap(),
        AuthOutcome::BadCredentials
    );
    let (acct, secret) = a.scram_secret("Carol@Example.org").await.unwrap().unwrap();
    assert_eq!(acct.address, "carol@example.org");
    assert_eq!(secret.iterations, 5000);
    assert!(secret.verify_password("carol pw"));
    // argon2 accounts, unknown users and bad addresses: no secret (the caller fakes one).
    assert!(a.scram_secret("alice@example.org").await.unwrap().is_none());
    assert!(
        a.scram_secret("nobody@example.org")
            .await
            .unwrap()
            .is_none()
    );
    assert!(a.scram_secret("not an address").await.unwrap().is_none());
    // passwd switches the scheme both ways.
    a.set_password_with(
        "alice@example.org",
        "new alice",
        PasswordScheme::ScramSha256 {
            iterations: scram::DEFAULT_ITERATIONS,
        },
    )
    .await
    .unwrap();
    let (_, s) = a.scram_secret("alice@example.org").await.unwrap().unwrap();
    assert_eq!(s.iterations, 4096);
    a.set_password("alice@example.org", "newer alice")
        .await
        .unwrap();
    assert!(a.scram_secret("alice@example.org").await.unwrap().is_none());
    // Disabled accounts are returned, flagged.
    a.set_disabled("carol@example.org", true).await.unwrap();
    let (acct, _) = a.scram_secret("carol@example.org").await.unwrap().unwrap();
    assert!(acct.disabled);
    // Refused: too few iterations, passwords SASLprep changes.
    for (pw, it) in [
        ("ok pw", 4095),
        ("ok pw", scram::MAX_ITERATIONS + 1),
        ("a\u{00A0}b", 4096),
    ] {
        invalid(
            a.account_add_with(
                "dave@example.org",
                pw,
                None,
                PasswordScheme::ScramSha256 { iterations: it },
            )
            .await,
        );
    }
    // Hashes imported from Dovecot are accepted.
    let h = scram::hash("imported", 4096);
    a.account_add_hashed("erin@example.org", &h, None)
        .await
        .unwrap();
    assert!(a.scram_secret("erin@example.org").await.unwrap().is_some());
}
