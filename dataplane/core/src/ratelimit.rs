//! Per-source connection rate limiting. (API skeleton: filled in by the rate-limit work.)
use std::net::IpAddr;
use std::time::Duration;

/// Shared by all workers; lock-free.
#[derive(Debug)]
pub struct SourceRateLimiter {
    max: u32,
    period: Duration,
}

impl SourceRateLimiter {
    pub fn new(max: u32, period: Duration) -> Self {
        SourceRateLimiter { max, period }
    }
    /// Counts one new connection from `ip` at monotonic time `now`; false when over the limit.
    pub fn allow(&self, ip: IpAddr, now: Duration) -> bool {
        let _ = (ip, now, self.max, self.period);
        true
    }
}
