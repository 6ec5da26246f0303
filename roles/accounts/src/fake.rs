//! Test backend: the SQLite store with call counters, to observe the cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sqlite::SqliteStore;
use crate::{Account, AccountError, AuthOutcome};

#[derive(Debug, Default)]
pub struct Counts {
    pub authenticate: AtomicUsize,
    pub account: AtomicUsize,
    pub resolve: AtomicUsize,
}

impl Counts {
    pub fn get(&self) -> (usize, usize, usize) {
        (
            self.authenticate.load(Ordering::SeqCst),
            self.account.load(Ordering::SeqCst),
            self.resolve.load(Ordering::SeqCst),
        )
    }
}

#[derive(Debug, Clone)]
pub struct FakeStore {
    pub inner: SqliteStore,
    pub counts: Arc<Counts>,
}

impl FakeStore {
    pub async fn authenticate(&self, u: &str, p: &str) -> Result<AuthOutcome, AccountError> {
        self.counts.authenticate.fetch_add(1, Ordering::SeqCst);
        self.inner.authenticate(u, p).await
    }
    pub async fn stored_password(
        &self,
        a: &str,
    ) -> Result<Option<(Account, String)>, AccountError> {
        self.inner.stored_password(a).await
    }
    pub async fn account(&self, a: &str) -> Result<Option<Account>, AccountError> {
        self.counts.account.fetch_add(1, Ordering::SeqCst);
        self.inner.account(a).await
    }
    pub async fn resolve(&self, a: &str) -> Result<Option<Account>, AccountError> {
        self.counts.resolve.fetch_add(1, Ordering::SeqCst);
        self.inner.resolve(a).await
    }
    pub async fn domain_add(&self, d: &str) -> Result<(), AccountError> {
        self.inner.domain_add(d).await
    }
    pub async fn domain_del(&self, d: &str) -> Result<(), AccountError> {
        self.inner.domain_del(d).await
    }
    pub async fn domain_list(&self) -> Result<Vec<String>, AccountError> {
        self.inner.domain_list().await
    }
    pub async fn is_local_domain(&self, d: &str) -> Result<bool, AccountError> {
        self.inner.is_local_domain(d).await
    }
    pub async fn account_add(&self, a: &str, h: &str, q: Option<u64>) -> Result<(), AccountError> {
        self.inner.account_add(a, h, q).await
    }
    pub async fn account_del(&self, a: &str) -> Result<(), AccountError> {
        self.inner.account_del(a).await
    }
    pub async fn set_password(&self, a: &str, h: &str) -> Result<(), AccountError> {
        self.inner.set_password(a, h).await
    }
    pub async fn set_disabled(&self, a: &str, d: bool) -> Result<(), AccountError> {
        self.inner.set_disabled(a, d).await
    }
    pub async fn account_list(&self, d: Option<&str>) -> Result<Vec<Account>, AccountError> {
        self.inner.account_list(d).await
    }
    pub async fn alias_add(&self, a: &str, t: &str) -> Result<(), AccountError> {
        self.inner.alias_add(a, t).await
    }
    pub async fn alias_del(&self, a: &str) -> Result<(), AccountError> {
        self.inner.alias_del(a).await
    }
    pub async fn alias_list(&self, d: Option<&str>) -> Result<Vec<(String, String)>, AccountError> {
        self.inner.alias_list(d).await
    }
}
