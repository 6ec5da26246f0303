//! Reconnect backoff for the session driver.

use std::time::{Duration, Instant};

/// Deterministic reconnect backoff: `initial` doubling up to `max`, reset once a session has
/// stayed Established for `stable_after`.
///
/// The driver calls [`Backoff::on_established`] when the session reports
/// [`Event::Established`](super::Event::Established), [`Backoff::on_closed`] when the transport
/// goes away, and [`Backoff::next_delay`] before each reconnect attempt:
///
/// ```
/// use std::time::{Duration, Instant};
/// use ringmail_announce_core::bgp::Backoff;
///
/// let mut b = Backoff::default();
/// assert_eq!(b.next_delay(), Duration::from_secs(1));
/// assert_eq!(b.next_delay(), Duration::from_secs(2));
/// let t = Instant::now();
/// b.on_established(t);
/// b.on_closed(t + Duration::from_secs(600)); // it was stable: start over
/// assert_eq!(b.next_delay(), Duration::from_secs(1));
/// ```
///
/// No jitter: a single proxy talks to a handful of routers, so synchronised reconnect storms
/// are not a concern, and determinism keeps the driver testable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    stable_after: Duration,
    current: Duration,
    established_at: Option<Instant>,
}

impl Default for Backoff {
    /// 1 s doubling to 30 s, reset after 60 s Established.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Backoff from `initial` doubling to `max` (clamped so that `max >= initial`), reset after
    /// 60 s Established.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            stable_after: Duration::from_secs(60),
            current: initial,
            established_at: None,
        }
    }

    /// How long a session must stay Established before the delay starts over at `initial`.
    pub fn with_stable_after(mut self, stable_after: Duration) -> Backoff {
        self.stable_after = stable_after;
        self
    }

    /// The delay to wait before the next connection attempt; doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        delay
    }

    /// The delay [`next_delay`](Self::next_delay) would return, without advancing.
    pub fn peek_delay(&self) -> Duration {
        self.current
    }

    /// The session reached Established at `now`.
    pub fn on_established(&mut self, now: Instant) {
        self.established_at = Some(now);
    }

    /// The session ended at `now`: if it had stayed Established for at least `stable_after`,
    /// the next delay is `initial` again; otherwise the doubling continues.
    pub fn on_closed(&mut self, now: Instant) {
        if let Some(at) = self.established_at.take()
            && now.saturating_duration_since(at) >= self.stable_after
        {
            self.current = self.initial;
        }
    }

    /// Start over at `initial` (e.g. after a configuration change).
    pub fn reset(&mut self) {
        self.current = self.initial;
        self.established_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_max_and_resets_after_stable_session() {
        let s = Duration::from_secs;
        let mut b = Backoff::default();
        let got: Vec<_> = (0..7).map(|_| b.next_delay()).collect();
        assert_eq!(got, [s(1), s(2), s(4), s(8), s(16), s(30), s(30)]);

        // A short-lived session does not reset the backoff.
        let t = Instant::now();
        b.on_established(t);
        b.on_closed(t + s(5));
        assert_eq!(b.next_delay(), s(30));

        // A stable one does.
        b.on_established(t);
        b.on_closed(t + s(60));
        assert_eq!(b.next_delay(), s(1));
        assert_eq!(b.peek_delay(), s(2));

        // Closing without having been established changes nothing.
        b.on_closed(t + s(1000));
        assert_eq!(b.next_delay(), s(2));
        b.reset();
        assert_eq!(b.next_delay(), s(1));
    }

    #[test]
    fn configurable() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(50)).with_stable_after(ms(10));
        assert_eq!(b.next_delay(), ms(100));
        assert_eq!(b.next_delay(), ms(100));
        let t = Instant::now();
        let mut b = Backoff::new(ms(100), ms(1000)).with_stable_after(ms(10));
        b.next_delay();
        b.on_established(t);
        b.on_closed(t + ms(10));
        assert_eq!(b.next_delay(), ms(100));
    }
}
