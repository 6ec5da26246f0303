//! End-to-end smoke test: start each server mode on an ephemeral loopback
//! port and run the matching load test briefly against it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ringmail-bench");

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(mode: &str) -> Server {
    let mut child = Command::new(BIN)
        .args(["server", "--listen", "127.0.0.1:0", "--mode", mode])
        .args(["--max-time", "60s"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("read server banner");
    let addr = line
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .expect("address in banner")
        .to_string();
    Server { child, addr }
}

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .arg("--quiet")
        .output()
        .expect("run client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON result")
}

#[test]
fn bulk_directions() {
    for (mode, dir) in [("sink", "up"), ("source", "down"), ("echo", "both")] {
        let s = server(mode);
        let pid = s.child.id().to_string();
        let r = run(&[
            "tcp",
            "bulk",
            "--target",
            &s.addr,
            "--duration",
            "300ms",
            "--streams",
            "2",
            "--direction",
            dir,
            "--pid",
            &pid,
        ]);
        assert_eq!(r["errors"], 0, "{dir}: {r}");
        assert!(r["gbit_s"].as_f64().unwrap() > 0.0, "{dir}: {r}");
        assert!(r["proxy_cpu_s"].is_number(), "{dir}: {r}");
    }
}

#[test]
fn connrate_echo() {
    let s = server("echo");
    let r = run(&[
        "tcp",
        "connrate",
        "--target",
        &s.addr,
        "--duration",
        "500ms",
        "--concurrency",
        "4",
    ]);
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["completed"].as_u64().unwrap() > 0, "{r}");
    assert!(r["latency"]["p99_us"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn connrate_max_conns_bound() {
    let s = server("echo");
    let r = run(&[
        "tcp",
        "connrate",
        "--target",
        &s.addr,
        "--duration",
        "10s",
        "--concurrency",
        "2",
        "--max-conns",
        "50",
    ]);
    let done = r["completed"].as_u64().unwrap();
    assert!(done <= 50 && done > 0, "{r}");
    assert!(r["duration_s"].as_f64().unwrap() < 9.0, "{r}");
}

#[test]
fn rr_modes() {
    let s = server("rr");
    let r = run(&[
        "tcp",
        "rr",
        "--target",
        &s.addr,
        "--duration",
        "500ms",
        "--connections",
        "4",
    ]);
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["requests_per_s"].as_f64().unwrap() > 0.0, "{r}");
    let e = server("echo");
    let r = run(&[
        "tcp",
        "rr",
        "--target",
        &e.addr,
        "--duration",
        "300ms",
        "--req-size",
        "100",
        "--resp-size",
        "100",
    ]);
    assert_eq!(r["errors"], 0, "{r}");
}

#[test]
fn idle_holds_connections() {
    let s = server("echo");
    let pid = s.child.id().to_string();
    let r = run(&[
        "tcp",
        "idle",
        "--target",
        &s.addr,
        "--connections",
        "200",
        "--settle",
        "200ms",
        "--pid",
        &pid,
    ]);
    assert_eq!(r["established"], 200, "{r}");
    assert_eq!(r["alive_after"], 200, "{r}");
    assert!(r["bytes_per_conn"].is_number(), "{r}");
    assert!(r["fds_after"].as_u64().unwrap() >= 200, "{r}");
}

#[test]
fn refuses_non_loopback() {
    let out = Command::new(BIN)
        .args(["tcp", "rr", "--target", "192.0.2.1:9", "--duration", "1s"])
        .output()
        .expect("run client");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
