//! The lookup and login cache in front of the store.
//!
//! - **resolve**: address -> `Option<Account>`, [`POSITIVE_TTL`] for hits and [`NEGATIVE_TTL`]
//!   for misses, so a spam run at unknown recipients or a flood of logins for unknown users
//!   reaches the store once per address per `NEGATIVE_TTL`.
//! - **logins**: successful logins are cached for [`POSITIVE_TTL`] and failed ones for
//!   [`NEGATIVE_TTL`], keyed by the user and a *keyed digest* of the attempted password:
//!   SHA-512/256-style truncation of SHA-512(process key ‖ user ‖ 0 ‖ password), where the 32-byte
//!   process key is random per process. No plaintext password, and no digest usable outside
//!   this process, is ever kept; a repeated login with the same password skips both the store
//!   and the argon2 verification, and a client retrying a stale password is absorbed too.
//!   Only the exact (user, password) pair matches: a different password always goes to the
//!   store.
//! - Every map is bounded ([`MAX_ENTRIES`]): when full, expired entries go first, then the
//!   entries closest to expiry.
//! - Any admin write through the same `Accounts` clears the whole cache (writes are rare, and
//!   an alias change affects several keys). Writes by other processes (another server, the
//!   admin CLI) are seen after at most the TTL.
//!
//! Time is `tokio::time::Instant`, so tests can pause and advance the clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha512};
use tokio::time::Instant;

use crate::Account;

/// How long a found account or a successful login is reused.
pub const POSITIVE_TTL: Duration = Duration::from_secs(30);
/// How long an unknown address or a failed login is reused.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Entries per map.
pub const MAX_ENTRIES: usize = 10_000;

struct TtlMap<K, V> {
    map: HashMap<K, (Instant, V)>,
    cap: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlMap<K, V> {
    fn new(cap: usize) -> Self {
        TtlMap {
            map: HashMap::new(),
            cap: cap.max(1),
        }
    }

    fn get(&mut self, k: &K, now: Instant) -> Option<V> {
        match self.map.get(k) {
            Some((exp, v)) if *exp > now => Some(v.clone()),
            Some(_) => {
                self.map.remove(k);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, k: K, v: V, ttl: Duration, now: Instant) {
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            self.map.retain(|_, (exp, _)| *exp > now);
            if self.map.len() >= self.cap {
                // Drop the eighth of the entries closest to expiry.
                let mut exps: Vec<Instant> = self.map.values().map(|(e, _)| *e).collect();
                let n = (self.cap / 8).max(1).min(exps.len() - 1);
                let (_, cut, _) = exps.select_nth_unstable(n);
                let cut = *cut;
                self.map.retain(|_, (exp, _)| *exp > cut);
            }
        }
        self.map.insert(k, (now + ttl, v));
    }

    fn clear(&mut self) {
        self.map.clear();
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

type LoginKey = (String, [u8; 32]);

struct Inner {
    resolve: TtlMap<String, Option<Account>>,
    /// `Some(account)`: a successful login; `None`: a failed one.
    logins: TtlMap<LoginKey, Option<Account>>,
}

/// Shared cache (cheap to clone).
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Mutex<Inner>>,
    key: Arc<[u8; 32]>,
    positive: Duration,
    negative: Duration,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl Default for Cache {
    fn default() -> Self {
        Cache::new(POSITIVE_TTL, NEGATIVE_TTL, MAX_ENTRIES)
    }
}

impl Cache {
    pub fn new(positive: Duration, negative: Duration, max_entries: usize) -> Cache {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random number generator is available");
        Cache {
            inner: Arc::new(Mutex::new(Inner {
                resolve: TtlMap::new(max_entries),
                logins: TtlMap::new(max_entries),
            })),
            key: Arc::new(key),
            positive,
            negative,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keyed digest identifying a (user, password) attempt.
    pub(crate) fn login_key(&self, user: &str, password: &str) -> LoginKey {
        let mut h = Sha512::new();
        h.update(self.key.as_slice());
        h.update(user.as_bytes());
        h.update([0u8]);
        h.update(password.as_bytes());
        let d = h.finalize();
        let mut out = [0u8; 32];
        out.copy_from_slice(&d[..32]);
        (user.to_string(), out)
    }

    /// `Some(Some(a))`: cached hit; `Some(None)`: cached miss; `None`: not cached.
    pub fn get_resolve(&self, address: &str) -> Option<Option<Account>> {
        self.lock()
            .resolve
            .get(&address.to_string(), Instant::now())
    }

    pub fn put_resolve(&self, address: &str, account: Option<Account>) {
        let ttl = if account.is_some() {
            self.positive
        } else {
            self.negative
        };
        self.lock()
            .resolve
            .insert(address.to_string(), account, ttl, Instant::now());
    }

    pub(crate) fn get_login(&self, key: &LoginKey) -> Option<Option<Account>> {
        self.lock().logins.get(key, Instant::now())
    }

    pub(crate) fn put_login(&self, key: LoginKey, account: Option<Account>) {
        let ttl = if account.is_some() {
            self.positive
        } else {
            self.negative
        };
        self.lock().logins.insert(key, account, ttl, Instant::now());
    }

    /// Forgets everything (after an admin write).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.resolve.clear();
        g.logins.clear();
    }

    /// Number of cached entries (resolve, logins).
    pub fn len(&self) -> (usize, usize) {
        let g = self.lock();
        (g.resolve.len(), g.logins.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_map_bounded_and_expiring() {
        let now = Instant::now();
        let mut m: TtlMap<u32, u32> = TtlMap::new(16);
        for i in 0..1000 {
            m.insert(i, i, Duration::from_secs(10 + u64::from(i)), now);
            assert!(m.len() <= 16);
        }
        // The most recent (longest-lived) entry survived.
        assert_eq!(m.get(&999, now), Some(999));
        assert_eq!(m.get(&999, now + Duration::from_secs(2000)), None);
        assert_eq!(m.len(), m.map.len());
    }

    #[test]
    fn login_key_is_keyed_and_distinct() {
        let a = Cache::default();
        let b = Cache::default();
        assert_eq!(a.login_key("u@x", "pw"), a.login_key("u@x", "pw"));
        assert_ne!(a.login_key("u@x", "pw"), a.login_key("u@x", "pw2"));
        assert_ne!(a.login_key("u@x", "pw"), b.login_key("u@x", "pw"));
        assert_ne!(a.login_key("u@x", "pw").1, a.login_key("u@y", "pw").1);
    }
}
