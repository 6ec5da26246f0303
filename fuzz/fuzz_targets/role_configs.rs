//! Fuzzes the role configuration front ends (`[mx]`, `[msa]`, `[mta]`, `[mda]`) and the
//! deployment topology (`ringmail deploy`) with arbitrary UTF-8.
//!
//! Invariants: no loader panics; a rejected file always carries at least one error, each
//! naming the file and sitting on a real position (line and column >= 1, line within the
//! text); an accepted file has what its role cannot run without.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail_proxy_core::config::ConfigErrors;

fn check_errors(text: &str, errors: &ConfigErrors) {
    assert!(!errors.0.is_empty(), "rejected without a reason");
    let lines = text.split('\n').count();
    for e in &errors.0 {
        assert_eq!(e.file, "fuzz.toml");
        assert!(e.line >= 1 && e.column >= 1, "no position: {e}");
        assert!(e.line <= lines, "line {} past the end ({lines} lines): {e}", e.line);
        assert!(!e.message.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ringmail_mx::config::load_str(text, "fuzz.toml") {
        Err(e) => check_errors(text, &e),
        Ok(c) => assert!(!c.listen.is_empty() && !c.domains.is_empty()),
    }
    match ringmail_mx::msa_config::load_str(text, "fuzz.toml") {
        Err(e) => check_errors(text, &e),
        Ok(c) => assert!(!c.listen.is_empty() || !c.listen_tls.is_empty()),
    }
    match ringmail_mx::mta_config::load_str(text, "fuzz.toml") {
        Err(e) => check_errors(text, &e),
        Ok(c) => {
            assert!(!c.listen.is_empty());
            assert!(!c.trusted_clients.is_empty() || c.accounts.is_some());
            assert!(c.max_per_destination >= 1 && c.max_connections >= 1);
        }
    }
    match ringmail_mx::mda_config::load_str(text, "fuzz.toml") {
        Err(e) => check_errors(text, &e),
        Ok(c) => {
            assert!(!c.lmtp.is_empty());
            assert!(c.programs.values().all(|argv| argv.first().is_some_and(|p| p.starts_with('/'))));
        }
    }
    // Relative DKIM key paths resolve against a directory that does not exist.
    match ringmail_deploy::topology::load_str(text, "fuzz.toml", std::path::Path::new("/nonexistent")) {
        Err(e) => check_errors(text, &e),
        Ok(t) => {
            assert!(!t.domains.is_empty() && !t.hosts.is_empty());
            let _ = ringmail_deploy::render(&t);
        }
    }
});
