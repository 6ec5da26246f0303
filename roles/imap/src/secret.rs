//! [`Secret`]: a password that never shows up in `Debug` output or error strings.

use std::fmt;

/// Credential bytes (a LOGIN or AUTHENTICATE PLAIN password). `Debug` prints `Secret(..)`; the bytes are overwritten when dropped
/// (best effort: copies made before, e.g. in the driver's TLS buffers, are out of reach).
#[derive(Clone, Default)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps credential bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The bytes, for checking them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The bytes as UTF-8, if they are.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl PartialEq for Secret {
    /// Compares without an early exit on the first differing byte.
    fn eq(&self, other: &Secret) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl Eq for Secret {}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.as_bytes().to_vec())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s.into_bytes())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites a buffer that held credentials.
pub(crate) fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *b = 0;
    }
    std::hint::black_box(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(s.expose_str(), Some("hunter2"));
        assert_eq!(s, Secret::from("hunter2"));
        assert_ne!(s, Secret::from("hunter3"));
    }
}
