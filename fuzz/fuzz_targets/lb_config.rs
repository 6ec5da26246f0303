//! Fuzzes the load balancer configuration front end with arbitrary UTF-8.
//!
//! Invariants: `load_str` never panics; a rejected file always carries at least one error, each
//! naming the file and sitting on a real position (line and column >= 1, line within the text);
//! an accepted file is internally consistent (listeners point at existing pools, pools have
//! backends, binds are unique, VIPs point at existing pools).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail_proxy_core::config::load_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match load_str(text, "fuzz.toml") {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "rejected without a reason");
            let lines = text.split('\n').count();
            for e in &errors.0 {
                assert_eq!(e.file, "fuzz.toml");
                assert!(e.line >= 1 && e.column >= 1, "no position: {e}");
                assert!(
                    e.line <= lines,
                    "line {} past the end ({lines} lines): {e}",
                    e.line
                );
                assert!(!e.message.is_empty());
            }
        }
        Ok(config) => {
            // Only a file with [announce] (for `ringmail announce`) may have no listener.
            assert!(!config.listeners.is_empty() || config.announce.is_some());
            if let Some(a) = &config.announce {
                assert!(!a.vips.is_empty());
                for v in &a.vips {
                    assert!(!v.pools.is_empty() && v.pools.iter().all(|&p| p < config.pools.len()));
                    assert!(v.min_healthy >= 1);
                }
            }
            for (i, l) in config.listeners.iter().enumerate() {
                assert!(l.pool < config.pools.len());
                assert!(config.listeners[..i].iter().all(|o| o.bind != l.bind));
            }
            for p in &config.pools {
                assert!(!p.backends.is_empty());
                assert!(p.backends.iter().all(|b| (1..=256).contains(&b.weight)));
                assert!(p.health.rise >= 1 && p.health.fall >= 1);
                assert!(p.health.timeout <= p.health.interval);
            }
        }
    }
});
