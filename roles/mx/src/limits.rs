//! Connection-count limits shared by the SMTP roles: all sessions, and per client address
//! (Postfix's `smtpd_client_connection_count_limit`). The client is the real one (from the
//! PROXY header when the peer is a trusted LB), so one busy client behind an LB cannot take
//! every session.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The counters behind the limits.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    max: usize,
    max_per_ip: usize,
    active: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// More than `max` sessions in all.
    Total,
    /// `max_per_ip` sessions from this address already.
    PerAddress,
}

/// A session counted against the limits while it lives.
#[derive(Debug)]
pub(crate) struct ConnSlot<'a> {
    limits: &'a ConnLimits,
    ip: IpAddr,
}

impl ConnLimits {
    pub fn new(max: usize, max_per_ip: usize) -> ConnLimits {
        ConnLimits {
            max,
            max_per_ip,
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a session from `ip`, or says which limit it is over.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnSlot<'_>, Refused> {
        let mut m = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if self.active.load(Ordering::Acquire) >= self.max {
            return Err(Refused::Total);
        }
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            if *n == 0 {
                m.remove(&ip);
            }
            return Err(Refused::PerAddress);
        }
        *n += 1;
        self.active.fetch_add(1, Ordering::AcqRel);
        Ok(ConnSlot { limits: self, ip })
    }

    /// Sessions counted now.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
        self.limits.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_and_total_limits() {
        let l = ConnLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let s2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refused::PerAddress);
        let s3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refused::Total);
        drop(s1);
        assert_eq!(l.active(), 2);
        let _s4 = l.admit(a).unwrap();
        drop((s2, s3));
        assert_eq!(l.active(), 1);
        assert_eq!(
            l.per_ip.lock().unwrap().len(),
            1,
            "no entry left for a gone address"
        );
    }
}
