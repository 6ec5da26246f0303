//! ringmail-bench: loopback load generators and backend servers used to
//! compare the ringmail load balancer against direct connections and
//! HAProxy. All traffic is restricted to loopback addresses, and every load
//! loop is bounded by a duration and a maximum count.

mod bulk;
mod connrate;
mod idle;
mod imap;
mod logins;
mod rr;
mod server;
mod submit;
mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use util::parse_duration;

#[derive(Debug, Parser)]
#[command(name = "ringmail-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a backend server (sink, echo, source or rr).
    Server(server::ServerArgs),
    /// Run a TCP load test against a target (server or proxy in front of it).
    Tcp {
        #[command(subcommand)]
        test: TcpTest,
    },
    /// Logins per second against an account store.
    Logins(logins::LoginArgs),
    /// Authenticated submissions (STARTTLS + AUTH PLAIN + one message per connection).
    Submit(submit::SubmitArgs),
    /// IMAP over implicit TLS: an operation mix, or sessions held in IDLE (memory per session).
    Imap {
        #[command(subcommand)]
        test: imap::ImapTest,
    },
}

#[derive(Debug, Subcommand)]
enum TcpTest {
    /// Bulk throughput: stream bytes for a duration (server: sink, source or echo).
    Bulk(bulk::BulkArgs),
    /// Connection rate: connect, send a request, read the echo, close (server: echo).
    Connrate(connrate::ConnrateArgs),
    /// Request/response over kept-alive connections (server: rr or echo).
    Rr(rr::RrArgs),
    /// Idle connections: open N, echo once each, hold, measure proxy RSS (server: echo).
    Idle(idle::IdleArgs),
}

/// Options shared by every load test.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Address to connect to (loopback only).
    #[arg(long)]
    pub target: SocketAddr,
    /// PID of the process under test (proxy); samples its CPU time (and RSS for idle).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Write the JSON result here instead of stdout.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Free-form label copied into the JSON result (e.g. the proxy name).
    #[arg(long)]
    pub label: Option<String>,
    /// Suppress the once-a-second progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Timeout for a single connect or request before it counts as an error.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub op_timeout: Duration,
}

/// Refuses anything but loopback addresses.
pub fn ensure_loopback(addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() && !on_loopback_interface(addr.ip()) {
        bail!(
            "{addr} is neither a loopback address nor assigned to the `lo` interface; \
             ringmail-bench only runs on loopback"
        );
    }
    Ok(())
}

/// True when `ip` is assigned to the loopback interface `lo` (as `bench/lb.sh` does for its
/// IPv6 runs, inside a network namespace of its own).
fn on_loopback_interface(ip: std::net::IpAddr) -> bool {
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            a.interface_name == "lo"
                && a.address.is_some_and(|s| match ip {
                    std::net::IpAddr::V4(v4) => s.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
                    std::net::IpAddr::V6(v6) => s.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
                })
        })
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Server(a) => server::run(a),
        Cmd::Tcp { test } => match test {
            TcpTest::Bulk(a) => bulk::run(a),
            TcpTest::Connrate(a) => connrate::run(a),
            TcpTest::Rr(a) => rr::run(a),
            TcpTest::Idle(a) => idle::run(a),
        },
        Cmd::Logins(a) => logins::run(a),
        Cmd::Submit(a) => submit::run(a),
        Cmd::Imap { test } => imap::run(test),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn loopback_only() {
        assert!(ensure_loopback("127.0.0.1:1".parse().unwrap()).is_ok());
        assert!(ensure_loopback("[::1]:1".parse().unwrap()).is_ok());
        assert!(ensure_loopback("10.0.0.1:1".parse().unwrap()).is_err());
    }
}
