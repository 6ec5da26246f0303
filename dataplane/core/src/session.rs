//! One proxied connection's lifecycle, without I/O.
//!
//! ```text
//!  accept ──▶ Connecting ──ok──▶ Relaying ──both FINs──▶ Closed
//!                │  ▲ fail: retry another backend (bounded)
//!                └──┘ fail, no backends left ──▶ Closed
//! ```
//!
//! The engine reports what happened (connect result, end of stream or error on a side, traffic)
//! and the session answers what to do next. Half-close is propagated one way at a time: when the
//! client finishes sending, the backend's write side is shut down, and the connection lives on
//! until the backend finishes too (SMTP's `QUIT` and IMAP's `LOGOUT` depend on this).

use std::time::Duration;

/// One of the two sockets of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Backend = 1,
}

impl Side {
    /// The socket that receives what this side sends.
    pub fn peer(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the backend connect to finish.
    Connecting,
    /// Bytes flow both ways.
    Relaying,
    /// Both sockets are to be closed.
    Closed,
}

/// What the engine must do after a connect failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterConnectFailure {
    /// Pick another backend (not one already tried) and connect again.
    Retry,
    /// No attempts left: close the client connection.
    GiveUp,
}

/// What the engine must do after a side stopped sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterEof {
    /// Once everything already received from that side has been sent on, shut down the
    /// write half of the given side.
    ShutdownWrite(Side),
    /// Close both sockets.
    Close,
}

/// The per-connection state machine. Small and `Copy`-free by design: it lives in every
/// connection slot, idle connections included.
#[derive(Debug, Clone)]
pub struct Session {
    phase: Phase,
    /// Connect attempts so far (the first one included).
    attempts: u32,
    /// Attempts allowed in total: 1 + retries.
    max_attempts: u32,
    /// Backends already tried for this connection, in order.
    tried: [u16; 4],
    tried_len: u8,
    /// Whether the latest attempt's backend is in `tried` (it is not past four).
    last_recorded: bool,
    /// `eof[side]`: that side has stopped sending.
    eof: [bool; 2],
    /// Monotonic milliseconds of the last traffic either way.
    last_activity_ms: u64,
}

impl Session {
    /// A session for a connection accepted at `now_ms`, allowed `retries` extra connects.
    pub fn new(now_ms: u64, retries: u32) -> Session {
        Session {
            phase: Phase::Connecting,
            attempts: 0,
            max_attempts: retries.saturating_add(1),
            tried: [0; 4],
            tried_len: 0,
            last_recorded: false,
            eof: [false; 2],
            last_activity_ms: now_ms,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Records that a connect to backend `index` is starting.
    pub fn connecting_to(&mut self, index: usize) {
        self.attempts += 1;
        self.last_recorded = (self.tried_len as usize) < self.tried.len();
        if self.last_recorded {
            self.tried[self.tried_len as usize] = u16::try_from(index).unwrap_or(u16::MAX);
            self.tried_len += 1;
        }
    }

    /// Backends already tried, to be excluded from the next pick. Only the first four are
    /// remembered; beyond that a retry may pick an earlier backend again.
    pub fn tried(&self) -> impl Iterator<Item = usize> + '_ {
        self.tried[..self.tried_len as usize]
            .iter()
            .map(|&i| i as usize)
    }

    /// Copies the tried list into `out` (cleared first), for the balancer.
    pub fn tried_into(&self, out: &mut Vec<usize>) {
        out.clear();
        out.extend(self.tried());
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The backend connect failed (refused, unreachable, timed out).
    pub fn on_connect_failed(&mut self) -> AfterConnectFailure {
        if self.phase != Phase::Connecting {
            self.phase = Phase::Closed;
            return AfterConnectFailure::GiveUp;
        }
        if self.attempts < self.max_attempts {
            AfterConnectFailure::Retry
        } else {
            self.phase = Phase::Closed;
            AfterConnectFailure::GiveUp
        }
    }

    /// The connect failed for a local reason (no free local port, out of descriptors or
    /// memory): not the backend's fault, so it may be picked again. Bounded like any retry.
    pub fn on_local_connect_failure(&mut self) -> AfterConnectFailure {
        if self.phase == Phase::Connecting && self.last_recorded && self.tried_len > 0 {
            self.tried_len -= 1;
            self.last_recorded = false;
        }
        self.on_connect_failed()
    }

    /// No backend could be picked for a retry.
    pub fn on_no_backend(&mut self) {
        self.phase = Phase::Closed;
    }

    /// The backend connect succeeded.
    pub fn on_connected(&mut self, now_ms: u64) {
        if self.phase == Phase::Connecting {
            self.phase = Phase::Relaying;
            self.last_activity_ms = now_ms;
        }
    }

    /// Bytes moved (either way) at `now_ms`.
    pub fn on_traffic(&mut self, now_ms: u64) {
        self.last_activity_ms = now_ms;
    }

    /// `side` will send nothing more (it shut down its write half, or we read end of stream).
    pub fn on_eof(&mut self, side: Side) -> AfterEof {
        if self.phase != Phase::Relaying {
            self.phase = Phase::Closed;
            return AfterEof::Close;
        }
        self.eof[side.index()] = true;
        if self.eof[side.peer().index()] {
            self.phase = Phase::Closed;
            AfterEof::Close
        } else {
            AfterEof::ShutdownWrite(side.peer())
        }
    }

    /// Whether `side` has stopped sending.
    pub fn is_eof(&self, side: Side) -> bool {
        self.eof[side.index()]
    }

    /// A socket error (reset, broken pipe) on either side: the connection is over.
    pub fn on_error(&mut self) {
        self.phase = Phase::Closed;
    }

    /// Forced close (drain deadline, shutdown).
    pub fn close(&mut self) {
        self.phase = Phase::Closed;
    }

    /// Whether the connection has been idle for `timeout` at `now_ms`.
    pub fn is_idle(&self, now_ms: u64, timeout: Duration) -> bool {
        now_ms.saturating_sub(self.last_activity_ms) >= timeout.as_millis() as u64
    }

    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded() {
        let mut s = Session::new(0, 2);
        s.connecting_to(0);
        assert_eq!(s.on_connect_failed(), AfterConnectFailure::Retry);
        s.connecting_to(1);
        assert_eq!(s.on_connect_failed(), AfterConnectFailure::Retry);
        s.connecting_to(2);
        assert_eq!(s.on_connect_failed(), AfterConnectFailure::GiveUp);
        assert_eq!(s.phase(), Phase::Closed);
        assert_eq!(s.tried().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn local_failure_allows_the_same_backend_again() {
        let mut s = Session::new(0, 2);
        s.connecting_to(5);
        assert_eq!(s.on_local_connect_failure(), AfterConnectFailure::Retry);
        assert_eq!(s.tried().count(), 0);
        s.connecting_to(5);
        assert_eq!(s.on_local_connect_failure(), AfterConnectFailure::Retry);
        s.connecting_to(5);
        // Still bounded by the number of attempts.
        assert_eq!(s.on_local_connect_failure(), AfterConnectFailure::GiveUp);
        assert_eq!(s.phase(), Phase::Closed);
    }

    #[test]
    fn local_failure_past_four_attempts_forgets_nothing_else() {
        let mut s = Session::new(0, 10);
        for i in 0..5 {
            s.connecting_to(i);
            assert_eq!(s.on_connect_failed(), AfterConnectFailure::Retry);
        }
        // The sixth attempt is not recorded (only four are): a local failure must not drop
        // one of the four that are.
        s.connecting_to(9);
        assert_eq!(s.on_local_connect_failure(), AfterConnectFailure::Retry);
        assert_eq!(s.tried().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn zero_retries_gives_up_at_once() {
        let mut s = Session::new(0, 0);
        s.connecting_to(3);
        assert_eq!(s.on_connect_failed(), AfterConnectFailure::GiveUp);
    }

    #[test]
    fn half_close_is_propagated_one_way_then_closes() {
        let mut s = Session::new(0, 1);
        s.connecting_to(0);
        s.on_connected(5);
        assert_eq!(s.phase(), Phase::Relaying);
        assert_eq!(
            s.on_eof(Side::Client),
            AfterEof::ShutdownWrite(Side::Backend)
        );
        assert_eq!(s.phase(), Phase::Relaying);
        assert!(s.is_eof(Side::Client));
        assert_eq!(s.on_eof(Side::Backend), AfterEof::Close);
        assert_eq!(s.phase(), Phase::Closed);
    }

    #[test]
    fn backend_first_half_close() {
        let mut s = Session::new(0, 1);
        s.connecting_to(0);
        s.on_connected(0);
        assert_eq!(
            s.on_eof(Side::Backend),
            AfterEof::ShutdownWrite(Side::Client)
        );
        assert_eq!(s.on_eof(Side::Client), AfterEof::Close);
    }

    #[test]
    fn eof_while_connecting_closes() {
        let mut s = Session::new(0, 1);
        s.connecting_to(0);
        assert_eq!(s.on_eof(Side::Client), AfterEof::Close);
        assert_eq!(s.phase(), Phase::Closed);
    }

    #[test]
    fn idle_timeout_tracks_traffic() {
        let mut s = Session::new(1000, 0);
        s.connecting_to(0);
        s.on_connected(1000);
        assert!(!s.is_idle(1500, Duration::from_secs(1)));
        assert!(s.is_idle(2000, Duration::from_secs(1)));
        s.on_traffic(1900);
        assert!(!s.is_idle(2000, Duration::from_secs(1)));
    }

    #[test]
    fn tried_list_is_capped_without_panicking() {
        let mut s = Session::new(0, 100);
        for i in 0..10 {
            s.connecting_to(i);
            assert_eq!(s.on_connect_failed(), AfterConnectFailure::Retry);
        }
        assert_eq!(s.tried().count(), 4);
        assert_eq!(s.attempts(), 10);
    }

    #[test]
    fn session_is_small() {
        assert!(std::mem::size_of::<Session>() <= 48);
    }
}
