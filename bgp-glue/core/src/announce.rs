//! Health in, desired announcements out: the per-VIP announcement state machine and the drain
//! sequence.
//!
//! ```text
//!                    healthy >= min for announce_delay (x2 per recent flap)
//!   ┌───────────┐ ─────────────────────────────────────────────► ┌───────────┐
//!   │ Withdrawn │                                                │ Announced │
//!   └───────────┘ ◄───────────────────────────────────────────── └───────────┘
//!         ▲          healthy < min, or the process stops serving       │
//!         │                                                            │ drain (SIGTERM/admin)
//!         │            graceful_wait elapsed, or unhealthy             ▼
//!         └──────────────────────────────────────────────────── ┌───────────┐
//!                                                               │ Graceful  │ 65535:0 + prepend
//!                                                               └───────────┘
//! ```
//!
//! The machine fails closed: a VIP is withdrawn the moment its pools drop below `min_healthy`
//! healthy backends (the load balancer's rise/fall counters already filtered single failed
//! checks), or the process stops serving. It is slow to come back: a VIP must stay healthy for
//! `announce_delay` before it is announced, and each withdrawal for health within the last
//! `flap_window` after the first doubles that delay (up to `max_announce_delay`), so a flapping
//! backend costs the routers one withdrawal and a late re-announcement, not a route flap per
//! check.
//!
//! Draining is one-way: every announced VIP is re-announced as graceful (GRACEFUL_SHUTDOWN
//! community and AS-path prepend), after `graceful_wait` everything is withdrawn, and the caller
//! (which sees [`DrainPhase::Withdrawn`]) removes the loopback addresses once the withdrawals are
//! on the wire, then waits for established connections.
//!
//! No clock is read here: every call takes `now`.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::route::Announcement;

/// Tunables of the state machine (all per process; `min_healthy` may be set per VIP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long a VIP must be continuously healthy before it is (re-)announced.
    pub announce_delay: Duration,
    /// Cap for the flap-doubled announce delay.
    pub max_announce_delay: Duration,
    /// Withdrawals for health within this window each double the announce delay.
    pub flap_window: Duration,
    /// How long routes stay announced with GRACEFUL_SHUTDOWN before they are withdrawn.
    pub graceful_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            announce_delay: Duration::from_secs(2),
            max_announce_delay: Duration::from_secs(60),
            flap_window: Duration::from_secs(300),
            graceful_wait: Duration::from_secs(10),
        }
    }
}

/// One VIP the machine decides for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSpec {
    pub addr: IpAddr,
    /// Healthy backends (summed over the VIP's pools) needed to announce it; at least 1.
    pub min_healthy: usize,
}

/// Where a VIP stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipState {
    Withdrawn,
    Announced,
    /// Announced with GRACEFUL_SHUTDOWN while the process drains.
    Graceful,
}

impl VipState {
    pub fn label(self) -> &'static str {
        match self {
            VipState::Withdrawn => "withdrawn",
            VipState::Announced => "announced",
            VipState::Graceful => "graceful",
        }
    }
}

/// Why a VIP changed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Healthy for the announce delay.
    Healthy {
        healthy: usize,
        min: usize,
        waited: Duration,
    },
    /// Fewer healthy backends than required.
    Unhealthy { healthy: usize, min: usize },
    /// The process stopped serving (workers gone, startup not finished).
    NotServing,
    /// The drain sequence began.
    DrainStarted,
    /// The drain's graceful wait is over.
    DrainWithdraw,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Healthy {
                healthy,
                min,
                waited,
            } => write!(
                f,
                "{healthy} healthy backends (need {min}) for {}ms",
                waited.as_millis()
            ),
            Reason::Unhealthy { healthy, min } => {
                write!(f, "{healthy} healthy backends, need {min}")
            }
            Reason::NotServing => f.write_str("the proxy is not serving"),
            Reason::DrainStarted => f.write_str("drain started: GRACEFUL_SHUTDOWN"),
            Reason::DrainWithdraw => f.write_str("drain: graceful wait over"),
        }
    }
}

/// One state change, kept for the status page and returned by [`Announcer::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub vip: IpAddr,
    pub at: Instant,
    pub from: VipState,
    pub to: VipState,
    pub reason: Reason,
}

/// The drain sequence as the caller must carry it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainPhase {
    /// Serving normally.
    Running,
    /// Routes re-announced as graceful until `until`.
    Graceful { until: Instant },
    /// Everything withdrawn: once the withdrawals are sent, remove loopback addresses and wait
    /// for established connections.
    Withdrawn,
}

#[derive(Debug)]
struct Vip {
    spec: VipSpec,
    state: VipState,
    healthy: usize,
    /// Since when the VIP has been continuously healthy (while withdrawn).
    healthy_since: Option<Instant>,
    /// Times of recent withdrawals for health, for the flap penalty.
    flaps: Vec<Instant>,
    last: Option<Transition>,
}

/// The per-process announcement state machine.
#[derive(Debug)]
pub struct Announcer {
    settings: Settings,
    vips: Vec<Vip>,
    serving: bool,
    drain: DrainPhase,
}

/// A read-only view of one VIP for status pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipStatus {
    pub addr: IpAddr,
    pub state: VipState,
    pub healthy: usize,
    pub min_healthy: usize,
    /// When a withdrawn, healthy VIP will be announced.
    pub announce_at: Option<Instant>,
    pub last: Option<Transition>,
}

impl Announcer {
    /// Every VIP starts withdrawn and the process not serving.
    pub fn new(settings: Settings, vips: Vec<VipSpec>) -> Announcer {
        let vips = vips
            .into_iter()
            .map(|mut spec| {
                spec.min_healthy = spec.min_healthy.max(1);
                Vip {
                    spec,
                    state: VipState::Withdrawn,
                    healthy: 0,
                    healthy_since: None,
                    flaps: Vec::new(),
                    last: None,
                }
            })
            .collect();
        Announcer {
            settings,
            vips,
            serving: false,
            drain: DrainPhase::Running,
        }
    }

    /// Number of VIPs, in the order given to [`Announcer::new`].
    pub fn len(&self) -> usize {
        self.vips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vips.is_empty()
    }

    /// Records the healthy backend count behind VIP `index`. Takes effect at the next
    /// [`Announcer::poll`].
    pub fn observe(&mut self, index: usize, healthy: usize, now: Instant) {
        let Some(v) = self.vips.get_mut(index) else {
            return;
        };
        v.healthy = healthy;
        if healthy >= v.spec.min_healthy {
            v.healthy_since.get_or_insert(now);
        } else {
            v.healthy_since = None;
        }
    }

    /// Whether the proxy is able to serve (workers running, not stopped). When it starts
    /// serving again, every VIP waits the full announce delay from `now`: health seen while the
    /// proxy could not serve proves nothing about the proxy.
    pub fn set_serving(&mut self, serving: bool, now: Instant) {
        if serving && !self.serving {
            for v in &mut self.vips {
                v.healthy_since = (v.healthy >= v.spec.min_healthy).then_some(now);
            }
        }
        self.serving = serving;
    }

    /// Starts the drain sequence (idempotent).
    pub fn begin_drain(&mut self, now: Instant) -> Vec<Transition> {
        if self.drain == DrainPhase::Running {
            self.drain = DrainPhase::Graceful {
                until: now + self.settings.graceful_wait,
            };
        }
        self.poll(now)
    }

    /// Ends a drain that was requested by an operator (not used on SIGTERM): graceful VIPs go
    /// back to plain announcements, withdrawn ones are re-announced once they have been healthy
    /// for the announce delay again.
    pub fn resume(&mut self, now: Instant) -> Vec<Transition> {
        self.drain = DrainPhase::Running;
        for v in &mut self.vips {
            if v.state == VipState::Withdrawn {
                v.healthy_since = (v.healthy >= v.spec.min_healthy).then_some(now);
            }
        }
        self.poll(now)
    }

    pub fn drain_phase(&self) -> DrainPhase {
        self.drain
    }

    /// Re-evaluates every VIP; returns the transitions made.
    pub fn poll(&mut self, now: Instant) -> Vec<Transition> {
        if let DrainPhase::Graceful { until } = self.drain
            && now >= until
        {
            self.drain = DrainPhase::Withdrawn;
        }
        let mut out = Vec::new();
        for i in 0..self.vips.len() {
            let (target, reason) = self.target(i, now);
            let v = &mut self.vips[i];
            if target == v.state {
                continue;
            }
            if target == VipState::Withdrawn
                && v.state == VipState::Announced
                && matches!(reason, Reason::Unhealthy { .. })
            {
                v.flaps.push(now);
            }
            let t = Transition {
                vip: v.spec.addr,
                at: now,
                from: v.state,
                to: target,
                reason,
            };
            v.state = target;
            if target == VipState::Withdrawn {
                // A later recovery must wait the full (penalised) delay from now on.
                v.healthy_since = (v.healthy >= v.spec.min_healthy).then_some(now);
            }
            v.last = Some(t.clone());
            out.push(t);
        }
        out
    }

    /// The state VIP `i` should be in now, and why.
    fn target(&mut self, i: usize, now: Instant) -> (VipState, Reason) {
        let drain = self.drain;
        let serving = self.serving;
        let announce_delay = self.delay_for(i, now);
        let v = &self.vips[i];
        let healthy = v.healthy >= v.spec.min_healthy;
        let unhealthy = Reason::Unhealthy {
            healthy: v.healthy,
            min: v.spec.min_healthy,
        };
        match drain {
            DrainPhase::Withdrawn => (VipState::Withdrawn, Reason::DrainWithdraw),
            DrainPhase::Graceful { .. } => match v.state {
                VipState::Withdrawn => (VipState::Withdrawn, Reason::DrainStarted),
                _ if !serving => (VipState::Withdrawn, Reason::NotServing),
                _ if !healthy => (VipState::Withdrawn, unhealthy),
                _ => (VipState::Graceful, Reason::DrainStarted),
            },
            DrainPhase::Running => {
                if !serving {
                    return (VipState::Withdrawn, Reason::NotServing);
                }
                if !healthy {
                    return (VipState::Withdrawn, unhealthy);
                }
                match (v.state, v.healthy_since) {
                    (VipState::Withdrawn, Some(since)) => {
                        let waited = now.saturating_duration_since(since);
                        if waited >= announce_delay {
                            (
                                VipState::Announced,
                                Reason::Healthy {
                                    healthy: v.healthy,
                                    min: v.spec.min_healthy,
                                    waited,
                                },
                            )
                        } else {
                            (VipState::Withdrawn, unhealthy)
                        }
                    }
                    (VipState::Withdrawn, None) => (VipState::Withdrawn, unhealthy),
                    // Announced stays; Graceful (a drain was resumed) becomes plain again.
                    (_, _) => (
                        VipState::Announced,
                        Reason::Healthy {
                            healthy: v.healthy,
                            min: v.spec.min_healthy,
                            waited: Duration::ZERO,
                        },
                    ),
                }
            }
        }
    }

    /// The announce delay for VIP `i`, doubled for each recent flap.
    fn delay_for(&mut self, i: usize, now: Instant) -> Duration {
        let window = self.settings.flap_window;
        let v = &mut self.vips[i];
        v.flaps
            .retain(|&t| now.saturating_duration_since(t) < window);
        let doublings = u32::try_from(v.flaps.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let factor = 1u32.checked_shl(doublings.min(16)).unwrap_or(u32::MAX);
        self.settings.announce_delay.saturating_mul(factor).min(
            self.settings
                .max_announce_delay
                .max(self.settings.announce_delay),
        )
    }

    /// When [`Announcer::poll`] should next be called even if no health changes arrive.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let DrainPhase::Graceful { until } = self.drain {
            consider(until);
        }
        if self.drain == DrainPhase::Running && self.serving {
            for i in 0..self.vips.len() {
                let delay = self.delay_for(i, now);
                let v = &self.vips[i];
                if v.state == VipState::Withdrawn
                    && let Some(since) = v.healthy_since
                {
                    consider(since + delay);
                }
            }
        }
        next
    }

    /// What should be announced now, in VIP order.
    pub fn desired(&self) -> Vec<Announcement> {
        self.vips
            .iter()
            .filter_map(|v| match v.state {
                VipState::Withdrawn => None,
                VipState::Announced => Some(Announcement {
                    prefix: v.spec.addr,
                    graceful: false,
                }),
                VipState::Graceful => Some(Announcement {
                    prefix: v.spec.addr,
                    graceful: true,
                }),
            })
            .collect()
    }

    /// Status of every VIP, in VIP order.
    pub fn status(&mut self, now: Instant) -> Vec<VipStatus> {
        let running = self.drain == DrainPhase::Running && self.serving;
        (0..self.vips.len())
            .map(|i| {
                let delay = self.delay_for(i, now);
                let v = &self.vips[i];
                VipStatus {
                    addr: v.spec.addr,
                    state: v.state,
                    healthy: v.healthy,
                    min_healthy: v.spec.min_healthy,
                    announce_at: match (running, v.state, v.healthy_since) {
                        (true, VipState::Withdrawn, Some(since)) => Some(since + delay),
                        _ => None,
                    },
                    last: v.last.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn machine(min: usize) -> (Announcer, Instant) {
        let a = Announcer::new(
            Settings {
                announce_delay: s(2),
                max_announce_delay: s(16),
                flap_window: s(100),
                graceful_wait: s(5),
            },
            vec![
                VipSpec {
                    addr: V4,
                    min_healthy: min,
                },
                VipSpec {
                    addr: V6,
                    min_healthy: min,
                },
            ],
        );
        (a, Instant::now())
    }

    fn states(a: &Announcer) -> Vec<VipState> {
        a.vips.iter().map(|v| v.state).collect()
    }

    #[test]
    fn nothing_is_announced_before_serving_and_the_delay() {
        let (mut a, t0) = machine(1);
        a.observe(0, 2, t0);
        a.observe(1, 2, t0);
        assert!(a.poll(t0 + s(10)).is_empty(), "not serving yet");
        a.set_serving(true, t0 + s(10));
        // Health seen before serving does not count: the delay runs from now.
        assert!(a.poll(t0 + s(11)).is_empty());
        let t = a.poll(t0 + s(12));
        assert_eq!(t.len(), 2);
        assert!(matches!(t[0].reason, Reason::Healthy { healthy: 2, .. }));
        assert_eq!(a.desired().len(), 2);
        assert!(a.desired().iter().all(|r| !r.graceful));
    }

    #[test]
    fn announce_waits_for_the_delay() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        a.observe(0, 1, t0);
        assert!(a.poll(t0 + Duration::from_millis(1999)).is_empty());
        assert_eq!(a.poll_timeout(t0), Some(t0 + s(2)));
        let t = a.poll(t0 + s(2));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, VipState::Announced);
        assert_eq!(states(&a), [VipState::Announced, VipState::Withdrawn]);
    }

    #[test]
    fn min_healthy_counts_backends() {
        let (mut a, t0) = machine(2);
        a.set_serving(true, t0);
        a.observe(0, 1, t0);
        assert!(a.poll(t0 + s(60)).is_empty());
        a.observe(0, 2, t0 + s(60));
        assert_eq!(a.poll(t0 + s(62)).len(), 1);
        a.observe(0, 1, t0 + s(63));
        let t = a.poll(t0 + s(63));
        assert_eq!(t[0].reason, Reason::Unhealthy { healthy: 1, min: 2 });
        assert!(a.desired().is_empty());
    }

    #[test]
    fn withdraw_is_immediate_and_fails_closed() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        a.observe(0, 3, t0);
        a.poll(t0 + s(2));
        a.observe(0, 0, t0 + s(3));
        let t = a.poll(t0 + s(3));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].at, t0 + s(3));
        assert_eq!(t[0].to, VipState::Withdrawn);
        // Not serving withdraws even with healthy backends.
        a.observe(0, 3, t0 + s(4));
        a.poll(t0 + s(6));
        assert_eq!(a.desired().len(), 1);
        a.set_serving(false, t0 + s(7));
        let t = a.poll(t0 + s(7));
        assert_eq!(t[0].reason, Reason::NotServing);
        assert!(a.desired().is_empty());
        // Serving again: announced only after the full delay.
        a.set_serving(true, t0 + s(8));
        assert!(a.poll(t0 + s(9)).is_empty());
        assert_eq!(a.poll(t0 + s(10)).len(), 1);
    }

    #[test]
    fn a_flapping_backend_does_not_flap_the_route() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        a.observe(0, 1, t0);
        a.poll(t0 + s(2));
        let mut changes = 0;
        // The backend goes down and up every second for a minute.
        for k in 3..63u64 {
            let now = t0 + s(k);
            a.observe(0, (k % 2) as usize, now);
            changes += a.poll(now).len();
        }
        // Each re-announcement needs 2 s of health, which a 1 s flap never gives: one withdrawal.
        assert_eq!(changes, 1);
        // Stable again: the penalty is one doubling per earlier flap (1 flap: 2 s).
        let now = t0 + s(64);
        a.observe(0, 1, now);
        assert!(a.poll(now + s(1)).is_empty());
        assert_eq!(a.poll(now + s(2)).len(), 1);
        // Second flap in the window: 4 s.
        a.observe(0, 0, now + s(3));
        a.poll(now + s(3));
        a.observe(0, 1, now + s(3));
        assert!(a.poll(now + s(6)).is_empty());
        assert_eq!(a.poll_timeout(now + s(6)), Some(now + s(7)));
        assert_eq!(a.poll(now + s(7)).len(), 1);
        // After the window the penalty is gone.
        let later = now + s(300);
        a.observe(0, 0, later);
        a.poll(later);
        a.observe(0, 1, later);
        assert_eq!(a.poll(later + s(2)).len(), 1);
    }

    #[test]
    fn penalty_is_capped() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        let mut now = t0;
        for _ in 0..10 {
            a.observe(0, 1, now);
            now += s(20);
            a.poll(now);
            assert_eq!(states(&a)[0], VipState::Announced);
            a.observe(0, 0, now);
            a.poll(now);
        }
        a.observe(0, 1, now);
        assert_eq!(a.poll_timeout(now), Some(now + s(16)));
    }

    #[test]
    fn drain_sequence() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        a.observe(0, 1, t0);
        a.poll(t0 + s(2));
        assert_eq!(a.drain_phase(), DrainPhase::Running);
        let t = a.begin_drain(t0 + s(10));
        assert_eq!(t.len(), 1, "only the announced VIP turns graceful");
        assert_eq!(t[0].to, VipState::Graceful);
        assert_eq!(
            a.desired(),
            vec![Announcement {
                prefix: V4,
                graceful: true
            }]
        );
        assert_eq!(a.drain_phase(), DrainPhase::Graceful { until: t0 + s(15) });
        // A second request does not restart the wait; the healthy withdrawn VIP stays down.
        a.observe(1, 5, t0 + s(11));
        assert!(a.begin_drain(t0 + s(14)).is_empty());
        assert_eq!(a.poll_timeout(t0 + s(14)), Some(t0 + s(15)));
        let t = a.poll(t0 + s(15));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].reason, Reason::DrainWithdraw);
        assert_eq!(a.drain_phase(), DrainPhase::Withdrawn);
        assert!(a.desired().is_empty());
        // Nothing comes back after the drain, whatever health says.
        a.observe(0, 9, t0 + s(16));
        assert!(a.poll(t0 + s(100)).is_empty());
    }

    #[test]
    fn resume_after_an_operator_drain() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        a.observe(0, 1, t0);
        a.observe(1, 1, t0);
        a.poll(t0 + s(2));
        a.begin_drain(t0 + s(3));
        // Resumed during the graceful wait: back to a plain announcement at once.
        let t = a.resume(t0 + s(4));
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.to == VipState::Announced));
        assert!(a.desired().iter().all(|r| !r.graceful));
        // Resumed after the withdrawal: announced again after the announce delay.
        a.begin_drain(t0 + s(5));
        a.poll(t0 + s(10));
        assert!(a.desired().is_empty());
        assert!(a.resume(t0 + s(11)).is_empty());
        assert_eq!(a.poll(t0 + s(13)).len(), 2);
    }

    #[test]
    fn unhealthy_during_drain_withdraws_at_once() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        a.observe(0, 1, t0);
        a.poll(t0 + s(2));
        a.begin_drain(t0 + s(3));
        a.observe(0, 0, t0 + s(4));
        let t = a.poll(t0 + s(4));
        assert_eq!(t[0].to, VipState::Withdrawn);
        assert!(a.desired().is_empty());
    }

    #[test]
    fn status_reports_last_transition_and_pending_announce() {
        let (mut a, t0) = machine(1);
        a.set_serving(true, t0);
        a.observe(1, 1, t0);
        let st = a.status(t0);
        assert_eq!(st[1].announce_at, Some(t0 + s(2)));
        assert_eq!(st[0].announce_at, None);
        a.poll(t0 + s(2));
        let st = a.status(t0 + s(2));
        let last = st[1].last.as_ref().unwrap();
        assert_eq!(last.to, VipState::Announced);
        assert!(last.reason.to_string().contains("1 healthy backends"));
    }

    #[test]
    fn unknown_index_is_ignored_and_min_zero_means_one() {
        let mut a = Announcer::new(
            Settings::default(),
            vec![VipSpec {
                addr: V4,
                min_healthy: 0,
            }],
        );
        let t0 = Instant::now();
        a.set_serving(true, t0);
        a.observe(7, 1, t0);
        a.observe(0, 0, t0);
        assert!(a.poll(t0 + s(100)).is_empty(), "0 healthy never announces");
    }
}
