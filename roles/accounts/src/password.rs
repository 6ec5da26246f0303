//! Password hashes, Dovecot compatible.
//!
//! Stored values use Dovecot's `{SCHEME}hash` form so a `passwd-file` or SQL table exported
//! from Dovecot works unchanged, and hashes written here work in Dovecot.
//!
//! | scheme                     | format                                           |
//! |----------------------------|--------------------------------------------------|
//! | `{ARGON2ID}` (`{ARGON2I}`) | PHC string `$argon2id$v=19$m=..,t=..,p=..$salt$hash` — what [`hash`] writes |
//! | `{SHA512-CRYPT}`           | `$6$[rounds=N$]salt$hash` (glibc crypt)          |
//! | `{SHA256-CRYPT}`           | `$5$[rounds=N$]salt$hash`                        |
//! | `{BLF-CRYPT}`              | bcrypt `$2y$` / `$2b$` / `$2a$` / `$2x$`          |
//! | `{SSHA512}`                | base64(sha512(password ‖ salt) ‖ salt)            |
//! | `{SCRAM-SHA-256}`          | `iterations,salt,StoredKey,ServerKey` (Dovecot 2.3; base64) — also usable by SASL SCRAM-SHA-256, see [`crate::scram`] |
//! | `{CRYPT}`                  | any of the crypt strings above (no DES crypt)     |
//! | `{PLAIN}`, `{CLEAR}`, `{CLEARTEXT}` | the password itself — **insecure**, accepted only so that old Dovecot installations can be imported; rehash them with `set_password` |
//! | no prefix                  | a bare PHC / crypt string (`$argon2…`, `$6$`, `$5$`, `$2…$`) |
//!
//! Scheme names are case-insensitive. An unknown or malformed value never matches (and logs a
//! warning naming only the scheme). Comparisons are constant time: the argon2, sha-crypt and
//! bcrypt crates compare in constant time themselves; `SSHA512` and `PLAIN` use `subtle`.
//!
//! Passwords and hashes are never logged.
//!
//! Argon2 verification computes in a work area (the hash's `m` KiB, 19 MiB for [`hash`]'s
//! parameters) taken from a small pool reused across logins: at most one per CPU is in use,
//! more logins at once wait for one. A burst of logins therefore never holds more than the
//! pool, and what it used stays in the pool instead of as freed heap the allocator keeps.
//! [`reserve_argon2_work_areas`] fills the pool up front (servers call it at startup).

use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Argon2, Block};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha_crypt::ShaCrypt;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Argon2id parameters for new hashes: OWASP's first recommended setting (19 MiB, 2 passes,
/// 1 lane), about 20-40 ms per hash on a current server core.
pub const ARGON2_M_KIB: u32 = 19 * 1024;
/// Argon2id passes.
pub const ARGON2_T: u32 = 2;
/// Argon2id lanes.
pub const ARGON2_P: u32 = 1;

fn argon2() -> Argon2<'static> {
    let params = argon2::Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None)
        .expect("static argon2 parameters are valid");
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// Hashes `password` with argon2id and a random 16-byte salt:
/// `{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
///
/// CPU-heavy (tens of milliseconds): call it from a blocking thread, as `Accounts` does.
pub fn hash(password: &str) -> String {
    let phc = argon2()
        .hash_password(password.as_bytes())
        .expect("argon2 hashing with a random salt cannot fail");
    format!("{{ARGON2ID}}{phc}")
}

/// Splits `{SCHEME}rest` into (uppercased scheme, rest); `None` if there is no prefix.
fn split_scheme(stored: &str) -> Option<(String, &str)> {
    let rest = stored.strip_prefix('{')?;
    let (scheme, value) = rest.split_once('}')?;
    Some((scheme.to_ascii_uppercase(), value))
}

/// Which verifier a bare crypt/PHC string needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Argon2,
    ShaCrypt,
    Bcrypt,
    Ssha512,
    Scram,
    Plain,
}

fn kind_of_bare(value: &str) -> Option<Kind> {
    if value.starts_with("$argon2id$") || value.starts_with("$argon2i$") {
        Some(Kind::Argon2)
    } else if value.starts_with("$6$") || value.starts_with("$5$") {
        Some(Kind::ShaCrypt)
    } else if ["$2y$", "$2b$", "$2a$", "$2x$"]
        .iter()
        .any(|p| value.starts_with(p))
    {
        Some(Kind::Bcrypt)
    } else {
        None
    }
}

/// Resolves a stored value to (verifier, the part after the scheme prefix).
fn classify(stored: &str) -> Result<(Kind, &str), String> {
    match split_scheme(stored) {
        None => kind_of_bare(stored)
            .map(|k| (k, stored))
            .ok_or_else(|| "unprefixed".to_string()),
        Some((scheme, value)) => {
            // Each crypt-style scheme names the prefix its value must carry.
            let crypt = |prefixes: &[&str], kind| {
                prefixes
                    .iter()
                    .any(|p| value.starts_with(p))
                    .then_some(kind)
            };
            let kind = match scheme.as_str() {
                "ARGON2ID" => crypt(&["$argon2id$"], Kind::Argon2),
                "ARGON2I" => crypt(&["$argon2i$"], Kind::Argon2),
                "SHA512-CRYPT" => crypt(&["$6$"], Kind::ShaCrypt),
                "SHA256-CRYPT" => crypt(&["$5$"], Kind::ShaCrypt),
                "BLF-CRYPT" => crypt(&["$2y$", "$2b$", "$2a$", "$2x$"], Kind::Bcrypt),
                "SSHA512" => Some(Kind::Ssha512),
                "SCRAM-SHA-256" => Some(Kind::Scram),
                "PLAIN" | "CLEAR" | "CLEARTEXT" => Some(Kind::Plain),
                "CRYPT" => kind_of_bare(value),
                _ => None,
            };
            kind.map(|k| (k, value)).ok_or(scheme)
        }
    }
}

/// True if `stored` is in a format [`verify`] understands (for importing pre-hashed passwords).
pub fn is_supported(stored: &str) -> bool {
    classify(stored).is_ok()
}

/// Checks `password` against a stored hash in any supported format (see the module table).
/// Unknown schemes and malformed values return `false`.
pub fn verify(stored: &str, password: &str) -> bool {
    let (kind, value) = match classify(stored) {
        Ok(x) => x,
        Err(scheme) => {
            // Log the scheme name only: never the hash or the password.
            let scheme: String = scheme
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(32)
                .collect();
            tracing::warn!(scheme = %scheme, "stored password uses an unknown scheme; login refused");
            return false;
        }
    };
    let pw = password.as_bytes();
    let ok = match kind {
        Kind::Argon2 => match PasswordHash::new(value) {
            // The parameters and variant come from the stored hash, not from `argon2()`.
            Ok(parsed) => verify_argon2(&parsed, pw),
            Err(_) => false,
        },
        Kind::ShaCrypt => ShaCrypt::default().verify_password(pw, value).is_ok(),
        Kind::Bcrypt => bcrypt::verify(pw, value).unwrap_or(false),
        Kind::Ssha512 => verify_ssha512(value, pw),
        Kind::Scram => crate::scram::verify(value, password),
        Kind::Plain => {
            // Compare digests so that the comparison does not depend on the length.
            let a = Sha512::digest(value.as_bytes());
            let b = Sha512::digest(pw);
            bool::from(a.as_slice().ct_eq(b.as_slice()))
        }
    };
    if !ok && kind != Kind::Plain && !is_well_formed(kind, value) {
        tracing::warn!("stored password hash is malformed; login refused");
    }
    ok
}

/// What `Argon2::verify_password` does, but computed in a pooled work area.
fn verify_argon2(parsed: &PasswordHash, password: &[u8]) -> bool {
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm.as_str()) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    // Also sets the output length to the stored hash's.
    let Ok(params) = argon2::Params::try_from(parsed) else {
        return false;
    };
    let blocks = params.block_count();
    let mut out = [0u8; 64];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    let ctx = Argon2::new(algorithm, version, params);
    let computed = with_work_area(blocks, |memory| {
        ctx.hash_password_into_with_memory(password, salt, &mut *out, memory)
            .is_ok()
    });
    computed && bool::from(out.ct_eq(expected.as_bytes()))
}

/// Work areas larger than this (64 MiB) are allocated for the one verification and freed.
const KEEP_MAX_BLOCKS: usize = 64 * 1024;

/// The pooled argon2 work areas.
struct WorkAreas {
    /// Free areas, and how many exist (free or in use).
    state: Mutex<(Vec<Vec<Block>>, usize)>,
    freed: Condvar,
    /// At most this many areas: one per CPU (more at once would only slow each one down).
    max: usize,
}

fn work_areas() -> &'static WorkAreas {
    static POOL: OnceLock<WorkAreas> = OnceLock::new();
    POOL.get_or_init(|| WorkAreas {
        state: Mutex::new((Vec::new(), 0)),
        freed: Condvar::new(),
        max: std::thread::available_parallelism().map_or(1, |n| n.get().min(16)),
    })
}

impl WorkAreas {
    fn lock(&self) -> MutexGuard<'_, (Vec<Vec<Block>>, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Returns its area to the pool when dropped (even if the computation panicked).
struct Lease(Option<Vec<Block>>);

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(area) = self.0.take() {
            let pool = work_areas();
            pool.lock().0.push(area);
            pool.freed.notify_one();
        }
    }
}

/// Runs `f` on a zeroed-or-reused work area of `blocks` blocks (argon2 overwrites every
/// block before reading it, so a reused area needs no clearing).
fn with_work_area<R>(blocks: usize, f: impl FnOnce(&mut [Block]) -> R) -> R {
    if blocks > KEEP_MAX_BLOCKS {
        return f(&mut vec![Block::new(); blocks]);
    }
    let pool = work_areas();
    let area = {
        let mut state = pool.lock();
        loop {
            if let Some(area) = state.0.pop() {
                break area;
            }
            if state.1 < pool.max {
                state.1 += 1;
                break Vec::new();
            }
            state = pool.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    };
    let mut lease = Lease(Some(area));
    let area = lease.0.as_mut().expect("leased area");
    if area.len() < blocks {
        area.resize(blocks, Block::new());
    }
    f(&mut area[..blocks])
}

/// Fills the argon2 work-area pool with one area per CPU for [`hash`]'s parameters, written
/// once so that they are resident from now on: the memory a burst of logins uses is then
/// part of the server's footprint at startup instead of growing the heap during the burst.
/// Returns the bytes reserved.
pub fn reserve_argon2_work_areas() -> usize {
    let pool = work_areas();
    let blocks = ARGON2_M_KIB as usize;
    let mut state = pool.lock();
    for area in state.0.iter_mut() {
        if area.len() < blocks {
            area.resize(blocks, Block::new());
        }
    }
    while state.1 < pool.max {
        state.0.push(vec![Block::new(); blocks]);
        state.1 += 1;
    }
    state.0.iter().map(|a| a.len() * Block::SIZE).sum()
}

fn is_well_formed(kind: Kind, value: &str) -> bool {
    match kind {
        Kind::Argon2 => PasswordHash::new(value).is_ok(),
        Kind::Ssha512 => STANDARD
            .decode(value.trim())
            .map(|raw| raw.len() > 64)
            .unwrap_or(false),
        Kind::Scram => crate::scram::is_well_formed(value),
        _ => true,
    }
}

fn verify_ssha512(value: &str, password: &[u8]) -> bool {
    let Ok(raw) = STANDARD.decode(value.trim()) else {
        return false;
    };
    if raw.len() <= 64 {
        return false;
    }
    let (digest, salt) = raw.split_at(64);
    let mut h = Sha512::new();
    h.update(password);
    h.update(salt);
    bool::from(h.finalize().as_slice().ct_eq(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated on Debian 12:
    //   openssl passwd -6 -salt Zf5Lk3mQ 'correct horse'
    const SHA512_OPENSSL: &str = "$6$Zf5Lk3mQ$AjFc1ITR63uxGwXk0izbcucl.HKqML4MBMNUXRMB4PzPkexW9lXu4RJI/kB2CAbuUjibF9cDobkfKWLHWAvFP.";
    //   python3 -c 'import crypt; print(crypt.crypt("correct horse", "$6$saltsalt$"))'
    const SHA512_GLIBC: &str = "$6$saltsalt$hRM5XZ86KXEw9UOmjigeVqFgULtFB2sgpC9lXQDfMib3Zgw7mEiUvBJI2EplzfAqxL5Vvwp2scFtv/uamSo5z0";
    //   python3 -c 'import crypt; print(crypt.crypt("correct horse", "$6$rounds=10000$Zf5Lk3mQ$"))'
    const SHA512_ROUNDS: &str = "$6$rounds=10000$Zf5Lk3mQ$K.0rd7TPau9/.aj8gHgUYsbhCOooI485hcRfKa0Lq7i9A6AJiwZJYHGyA9bI9vVWSCMDftfwcdCB8NbwAEody.";
    //   openssl passwd -5 -salt Zf5Lk3mQ 'correct horse'
    const SHA256_OPENSSL: &str = "$5$Zf5Lk3mQ$ck.fW.yES4R3/w3WclYYRvSwgIjRTlIeWpccDWwABG.";
    //   python3 -c 'import crypt; print(crypt.crypt("correct horse", "$2b$05$abcdefghijklmnopqrstuu"))'
    //   (libxcrypt; $2y$ gives the same hash)
    const BCRYPT_2B: &str = "$2b$05$abcdefghijklmnopqrstuuHNbAKRhpaujgo33bRWs.NLUTJO3lOy2";
    const BCRYPT_2Y: &str = "$2y$05$abcdefghijklmnopqrstuuHNbAKRhpaujgo33bRWs.NLUTJO3lOy2";
    //   python3 hashlib: b64(sha512(b"correct horse" + bytes(range(1, 9))) + salt)
    const SSHA512: &str = "ggObOJHDWCqgI5uFv/j9yDNYMvdTgt+Toj8d6cGrSG/e+E9GbH4DkQ8y5jY3NblhoGens+zNVX1mZaFy0qwRwwECAwQFBgcI";
    //   same with password "pässword" (UTF-8) and salt 9a3c5e7f10243b4d
    const SSHA512_UTF8: &str = "d6/uH3mottuLh+rVAlS/vWbkdbYJ1nDRJ/W2B9iMF0xoZADKFl1tMEc1TDS1KNDF1ZZKYZgvccXYfmf5PkrHp5o8Xn8QJDtN";
    // Reference implementation (phc-winner-argon2) known-answer tests, password "password",
    // salt "somesalt".
    const ARGON2ID_KAT: &str =
        "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4";
    const ARGON2I_KAT: &str =
        "$argon2i$v=19$m=256,t=2,p=1$c29tZXNhbHQ$iekCn0Y3spW+sCcFanM2xBT63UP2sghkUoHLIUpWRS8";

    fn both(stored: &str, right: &str) {
        assert!(verify(stored, right), "{stored} should accept");
        assert!(!verify(stored, "wrong"), "{stored} should refuse");
        assert!(!verify(stored, ""), "{stored} should refuse empty");
    }

    #[test]
    fn sha512_crypt_vectors() {
        for h in [SHA512_OPENSSL, SHA512_GLIBC, SHA512_ROUNDS] {
            both(&format!("{{SHA512-CRYPT}}{h}"), "correct horse");
            both(&format!("{{sha512-crypt}}{h}"), "correct horse");
            both(&format!("{{CRYPT}}{h}"), "correct horse");
            both(h, "correct horse");
        }
        both(
            &format!("{{SHA256-CRYPT}}{SHA256_OPENSSL}"),
            "correct horse",
        );
        // Scheme and value disagree: refused.
        assert!(!verify(
            &format!("{{SHA512-CRYPT}}{SHA256_OPENSSL}"),
            "correct horse"
        ));
    }

    #[test]
    fn bcrypt_vectors() {
        for h in [BCRYPT_2B, BCRYPT_2Y] {
            both(&format!("{{BLF-CRYPT}}{h}"), "correct horse");
            both(h, "correct horse");
        }
    }

    #[test]
    fn ssha512_vectors() {
        both(&format!("{{SSHA512}}{SSHA512}"), "correct horse");
        both(&format!("{{SSHA512}}{SSHA512_UTF8}"), "pässword");
        assert!(!verify("{SSHA512}not base64!", "correct horse"));
        assert!(!verify("{SSHA512}AAAA", ""));
    }

    #[test]
    fn argon2_vectors() {
        both(&format!("{{ARGON2ID}}{ARGON2ID_KAT}"), "password");
        both(&format!("{{ARGON2I}}{ARGON2I_KAT}"), "password");
        both(ARGON2ID_KAT, "password");
        assert!(!verify("{ARGON2ID}$argon2id$v=19$garbage", "password"));
    }

    #[test]
    fn argon2_work_areas_are_reused_across_sizes_and_threads() {
        let big = hash("s3cret pass");
        reserve_argon2_work_areas();
        // Small (m=256) and large (m=19456) hashes alternate on the same areas, from more
        // threads than there are areas: every result is still right.
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let big = big.clone();
                std::thread::spawn(move || {
                    for _ in 0..2 {
                        if i % 2 == 0 {
                            both(ARGON2ID_KAT, "password");
                        } else {
                            assert!(verify(&big, "s3cret pass"));
                            assert!(!verify(&big, "s3cret pasS"));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("verifier thread");
        }
        // Never more areas than CPUs (other tests may hold some right now).
        let pool = work_areas();
        let state = pool.lock();
        assert!(state.1 <= pool.max);
        assert!(state.0.len() <= state.1);
    }

    #[test]
    fn plain_is_accepted_for_dovecot_imports() {
        both("{PLAIN}correct horse", "correct horse");
        both("{CLEAR}correct horse", "correct horse");
        assert!(!verify("{PLAIN}correct horse", "correct horse "));
        assert!(!verify("{PLAIN}", "x"));
    }

    #[test]
    fn unknown_schemes_never_match() {
        for stored in [
            "",
            "correct horse",
            "{MD5}correct horse",
            "{SHA}x",
            "{SSHA}x",
            "{UNKNOWN}$6$x$y",
            "{CRYPT}abJnggxhB/yWI",
            "$1$abc$def",
            "{ARGON2ID",
            "{}",
        ] {
            assert!(!verify(stored, "correct horse"), "{stored}");
            assert!(!is_supported(stored), "{stored}");
        }
    }

    #[test]
    fn hash_round_trips_with_owasp_params() {
        let h = hash("s3cret pass");
        assert!(
            h.starts_with("{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$"),
            "{h}"
        );
        assert!(is_supported(&h));
        assert!(verify(&h, "s3cret pass"));
        assert!(!verify(&h, "s3cret pasS"));
        // Random salt.
        assert_ne!(h, hash("s3cret pass"));
    }
}
