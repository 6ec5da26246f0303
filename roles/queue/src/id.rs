//! Queue ids: short, unique, sortable, safe as file names.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::QueueError;

/// Lower-case Crockford base32: digits then letters without i, l, o, u. The alphabet is in ASCII
/// order, so ids sort like the numbers they encode.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// 11 characters of microseconds since the epoch (55 bits), 4 of a per-process counter (20 bits),
/// 4 random (20 bits).
const TIME_CHARS: usize = 11;
const COUNTER_CHARS: usize = 4;
const RANDOM_CHARS: usize = 4;
/// Length of every queue id.
pub const ID_LEN: usize = TIME_CHARS + COUNTER_CHARS + RANDOM_CHARS;

/// A queue id like `0pbv3k2x9q40001a7kz`: arrival time in microseconds, a per-process counter
/// and 20 random bits, in base32. Ids of one process sort by creation order; ids sort by time
/// across processes. Only `[0-9a-z]`, so they are safe as file names and in headers.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn encode(mut v: u64, n: usize, out: &mut String) {
    let mut buf = [0u8; 13];
    for slot in buf[..n].iter_mut().rev() {
        *slot = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    out.extend(buf[..n].iter().map(|&b| b as char));
}

/// A random 64-bit number without a dependency: the std hasher's per-process random keys mixed
/// with the time and a counter.
pub(crate) fn random_u64() -> u64 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(SEQ.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl QueueId {
    /// A fresh id.
    pub fn generate() -> QueueId {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
        let mut s = String::with_capacity(ID_LEN);
        encode(micros, TIME_CHARS, &mut s);
        encode(counter & 0xf_ffff, COUNTER_CHARS, &mut s);
        encode(random_u64() & 0xf_ffff, RANDOM_CHARS, &mut s);
        QueueId(s)
    }

    /// Parses and validates an id (as found in a file name or given on a command line).
    pub fn parse(s: &str) -> Result<QueueId, QueueError> {
        if s.len() == ID_LEN && s.bytes().all(|b| ALPHABET.contains(&b)) {
            Ok(QueueId(s.to_owned()))
        } else {
            Err(QueueError::InvalidId(s.to_owned()))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for QueueId {
    type Error = QueueError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        QueueId::parse(&s)
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> String {
        id.0
    }
}

impl std::str::FromStr for QueueId {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QueueId::parse(s)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueueId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sortable_and_valid() {
        let ids: Vec<QueueId> = (0..1000).map(|_| QueueId::generate()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        assert_eq!(sorted, ids, "ids of one process sort in creation order");
        for id in &ids {
            assert_eq!(QueueId::parse(id.as_str()).unwrap(), *id);
        }
        assert!(QueueId::parse("../etc/passwd").is_err());
        assert!(QueueId::parse("0000000000000000000I").is_err());
    }
}
