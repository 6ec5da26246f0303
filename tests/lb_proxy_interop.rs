//! PROXY protocol interop with a real receiver: HAProxy.
//!
//! ```text
//! test client ──▶ ringmail lb ──PROXY v1/v2──▶ haproxy (accept-proxy) ──PROXY v1──▶ reporter
//! ```
//! HAProxy only forwards the client address it parsed from ringmail's header, so the reporter
//! seeing the test client's own local address proves ringmail's header is valid and correct.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

const HAPROXY: &str = "/usr/sbin/haproxy";

/// HAProxy in TCP mode: `accept-proxy` on its frontend, `send-proxy` (v1) to the reporter.
struct HaproxyChain {
    front: SocketAddr,
    _reporter: Backend,
    _haproxy: ChildGuard,
    _dir: TempDir,
}

impl HaproxyChain {
    fn start(haproxy: PathBuf) -> HaproxyChain {
        let reporter = Backend::any(Mode::ProxyV1Report);
        let front = free_addr();
        let dir = TempDir::new("haproxy");
        let cfg = dir.write(
            "haproxy.cfg",
            &format!(
                "global
    maxconn 200

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend fe
    bind {front} accept-proxy
    default_backend be

backend be
    server reporter {reporter} send-proxy
",
                reporter = reporter.addr
            ),
        );
        let (status, out) = run_bounded(
            Command::new(&haproxy).arg("-c").arg("-f").arg(&cfg),
            Duration::from_secs(20),
        );
        assert!(status.success(), "haproxy rejects the test config:\n{out}");

        let mut cmd = Command::new(&haproxy);
        cmd.arg("-f").arg(&cfg).arg("-db");
        let mut guard = ChildGuard::spawn("haproxy", &mut cmd, dir.path().join("haproxy.log"))
            .expect("spawn haproxy");
        let up = wait_for(Duration::from_secs(10), || {
            if let Some(s) = guard.try_wait() {
                panic!("haproxy exited at startup with {s}");
            }
            is_listening(front.port()).then_some(())
        });
        assert!(up.is_some(), "haproxy not listening on {front} within 10 s");
        HaproxyChain {
            front,
            _reporter: reporter,
            _haproxy: guard,
            _dir: dir,
        }
    }
}

fn chain(engine: &str, version: &str) {
    skip_unless!(engine_available(engine));
    skip_unless!(find_binary(HAPROXY));
    let hp = HaproxyChain::start(PathBuf::from(HAPROXY));
    let lb = Quick::new(engine)
        .backend(hp.front)
        .opt("--proxy-protocol", version)
        .start();
    lb.wait_backend_up("default", hp.front, true, Duration::from_secs(5));
    for i in 0..5 {
        let mut s = connect(lb.addr()).unwrap();
        let me = s.local_addr().unwrap();
        let seen = read_line(&mut s)
            .unwrap_or_else(|e| panic!("connection {i}: no report through haproxy: {e}"));
        assert_eq!(
            seen,
            me.to_string(),
            "PROXY {version}: haproxy saw a different client address"
        );
    }
}

macro_rules! per_engine {
    ($($engine:ident),*) => {
        $(
            mod $engine {
                #[test]
                fn proxy_v1_through_haproxy() {
                    super::chain(stringify!($engine), "v1");
                }
                #[test]
                fn proxy_v2_through_haproxy() {
                    super::chain(stringify!($engine), "v2");
                }
            }
        )*
    };
}

per_engine!(uring, epoll);
