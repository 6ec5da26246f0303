//! The announcer without root: no loopback management, one BGP neighbour that refuses
//! connections. Checks the drain bookkeeping and the shutdown latch.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ringmail_bgp_glue::glue::{Glue, HealthReading};
use ringmail_proxy_core::config::{Announce, AnnounceMode, Bgp, Loopback, Neighbor, Vip};

fn config() -> Announce {
    Announce {
        mode: AnnounceMode::Bgp(Bgp {
            local_as: 65001,
            router_id: Ipv4Addr::new(10, 0, 0, 2),
            hold_time: Duration::from_secs(9),
            connect_retry: Duration::from_secs(1),
            max_connect_retry: Duration::from_secs(2),
            neighbors: vec![Neighbor {
                name: "nobody".into(),
                // Nothing listens on port 1 of loopback: connects are refused at once.
                addr: "127.0.0.1:1".parse().unwrap(),
                remote_as: 65000,
                local_address: None,
                ipv4: true,
                ipv6: false,
                med: None,
                local_pref: 100,
                communities: Vec::new(),
                next_hop_v4: None,
                next_hop_v6: None,
            }],
        }),
        loopback: Loopback::None,
        announce_delay: Duration::from_millis(100),
        max_announce_delay: Duration::from_secs(1),
        flap_window: Duration::ZERO,
        graceful_wait: Duration::from_millis(200),
        drain_prepend: 0,
        handoff: None,
        vips: vec![Vip {
            addr: "192.0.2.1".parse().unwrap(),
            pools: vec![0],
            min_healthy: 1,
        }],
    }
}

fn wait_state(glue: &Glue, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while glue.status_json()["vips"][0]["state"] != want {
        assert!(Instant::now() < deadline, "{}", glue.status_json());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn drain_with_nothing_announced_returns_after_the_graceful_wait() {
    let glue = Glue::start(
        &config(),
        Box::new(|| HealthReading {
            serving: true,
            healthy: vec![0],
        }),
        None,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    glue.drain(Duration::from_secs(4));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "drain took {:?}",
        t.elapsed()
    );
    assert_eq!(glue.status_json()["drain"], "withdrawn");
    glue.stop();
}

#[test]
fn the_shutdown_drain_cannot_be_resumed_but_an_admin_drain_can() {
    let glue = Glue::start(
        &config(),
        Box::new(|| HealthReading {
            serving: true,
            healthy: vec![1],
        }),
        None,
    )
    .unwrap();
    wait_state(&glue, "announced");
    let st = glue.status_json();
    assert_eq!(st["neighbors"][0]["state"], "active", "{st}");
    assert!(st["neighbors"][0]["connect_failures"].as_u64().unwrap() >= 1);

    // Admin drain, then resume: announced again after the announce delay.
    glue.request_drain();
    wait_state(&glue, "graceful");
    wait_state(&glue, "withdrawn");
    assert!(glue.resume());
    wait_state(&glue, "announced");

    // The shutdown drain latches: resume is refused, the VIP stays withdrawn.
    glue.drain(Duration::from_secs(4));
    assert!(!glue.resume());
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(glue.status_json()["vips"][0]["state"], "withdrawn");
    glue.stop();
}

#[test]
fn not_serving_withdraws_and_waits_the_delay_again() {
    let serving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = std::sync::Arc::clone(&serving);
    let glue = Glue::start(
        &config(),
        Box::new(move || HealthReading {
            serving: flag.load(std::sync::atomic::Ordering::SeqCst),
            healthy: vec![3],
        }),
        None,
    )
    .unwrap();
    wait_state(&glue, "announced");
    serving.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_state(&glue, "withdrawn");
    let last = glue.status_json()["vips"][0]["last_transition"]["what"].clone();
    assert!(last.as_str().unwrap().contains("not serving"), "{last}");
    serving.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_state(&glue, "announced");
    let m = {
        let mut s = String::new();
        glue.render_metrics(&mut s);
        s
    };
    assert!(
        m.contains("ringmail_announce_vip_state{vip=\"192.0.2.1\",state=\"announced\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ringmail_bgp_session_established{neighbor=\"nobody\"} 0"),
        "{m}"
    );
    glue.stop();
}
