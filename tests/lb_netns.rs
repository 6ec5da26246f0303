//! Tests that need a network namespace of their own (root only): the load balancer, its
//! backend and the clients all run inside a namespace whose ephemeral port range holds two
//! ports, so the proxy runs out of local ports for backend connections on purpose.
//!
//! What it proves: a connect that fails for a local reason (EADDRNOTAVAIL: no free port) is
//! counted as a local error and retried, and never marks the backend down — only failures the
//! backend causes count toward passive health.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// A network namespace deleted on drop.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Result<Netns, String> {
        let name = format!("ringmail-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        run(&["netns", "add", &name])?;
        let ns = Netns(name);
        run(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs inside the namespace.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<(), String> {
        let out = self
            .cmd("sysctl")
            .args(["-w", &format!("{key}={value}")])
            .output()
            .map_err(|e| format!("sysctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Echo server for the namespace (one thread per connection).
const ECHO: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The client side. Every client socket binds an explicit port outside the two-port
/// ephemeral range, so only the proxy's backend connections compete for the range.
const CLIENT: &str = r#"
import socket, sys, time
lb, admin = int(sys.argv[1]), int(sys.argv[2])
def conn(port, dst):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.settimeout(5); s.connect(("127.0.0.1", dst)); return s
def echo(s):
    s.sendall(b"ping")
    try: return s.recv(4)
    except Exception: return b""
def metrics(port):
    s = conn(port, admin); s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = b""
    while True:
        d = s.recv(65536)
        if not d: break
        out += d
    return out.decode()
held = [conn(31001 + i, lb) for i in range(2)]
print("held", [echo(h) == b"ping" for h in held])
third = conn(31010, lb)
print("third", echo(third))
print("METRICS-BEGIN"); print(metrics(31020)); print("METRICS-END")
"#;

#[test]
fn local_port_exhaustion_never_marks_the_backend_down() {
    if !is_root() {
        skip("needs root to create a network namespace");
        return;
    }
    let runs = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !runs("ip", "-V") || !runs("python3", "--version") {
        skip("needs ip (iproute2) and python3");
        return;
    }
    for engine in ["uring", "epoll"] {
        if engine == "uring"
            && let Err(e) = engine_available("uring")
        {
            skip(&e);
            continue;
        }
        let ns = Netns::create("ports").expect("create network namespace");
        ns.sysctl("net.ipv4.ip_local_port_range", "40000 40001")
            .expect("set a two-port ephemeral range");
        let dir = TempDir::new("netns");
        let (lb_port, backend_port, admin_port) = (20000u16, 20001u16, 20002u16);
        let _echo = ChildGuard::spawn(
            "echo",
            ns.cmd("python3")
                .args(["-c", ECHO, &backend_port.to_string()]),
            dir.path().join("echo.log"),
        )
        .expect("start echo backend");
        let listening = wait_for(Duration::from_secs(5), || {
            let out = ns
                .cmd("ss")
                .args(["-Hltn", &format!("sport = :{backend_port}")])
                .output()
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        });
        assert!(
            listening.is_some(),
            "[{engine}] echo backend did not start listening"
        );
        let lb = ChildGuard::spawn(
            "ringmail lb",
            ns.cmd(env!("CARGO_BIN_EXE_ringmail")).args([
                "lb",
                "--listen",
                &format!("127.0.0.1:{lb_port}"),
                "--backend",
                &format!("127.0.0.1:{backend_port}"),
                "--admin",
                &format!("127.0.0.1:{admin_port}"),
                "--engine",
                engine,
                // One check at start, none during the test: passive health is what is tested.
                "--health-interval",
                "60s",
                "--fall",
                "1",
            ]),
            dir.path().join("lb.log"),
        )
        .expect("start lb");
        // Let the start-up check's socket leave its port (TIME_WAIT reuse needs a second).
        std::thread::sleep(Duration::from_millis(2500));

        let out = ns
            .cmd("python3")
            .args(["-c", CLIENT, &lb_port.to_string(), &admin_port.to_string()])
            .output()
            .expect("run client");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "[{engine}] client failed: {stdout}\n{}\nlb log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            lb.log_text()
        );
        assert!(stdout.contains("held [True, True]"), "[{engine}] {stdout}");
        // Two backend connections use both local ports: the third cannot get one and its
        // client is closed after the bounded retries.
        assert!(
            stdout.contains("third b''"),
            "[{engine}] third connection was served?\n{stdout}"
        );
        let metrics_text = stdout
            .split("METRICS-BEGIN")
            .nth(1)
            .and_then(|m| m.split("METRICS-END").next())
            .unwrap_or_default();
        let body = metrics_text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or(metrics_text);
        let samples = parse_metrics(body).expect("metrics parse");
        let local = metric_sum(
            &samples,
            "ringmail_lb_worker_local_connect_errors_total",
            &[],
        );
        let backend_errors = metric_sum(&samples, "ringmail_lb_backend_connect_errors_total", &[]);
        let up = metric_sum(&samples, "ringmail_lb_backend_up", &[]);
        assert!(
            local >= 1.0,
            "[{engine}] no local connect error counted\n{body}"
        );
        assert_eq!(
            backend_errors, 0.0,
            "[{engine}] local errors blamed on the backend"
        );
        assert_eq!(
            up, 1.0,
            "[{engine}] backend marked down by local port exhaustion"
        );
    }
}
