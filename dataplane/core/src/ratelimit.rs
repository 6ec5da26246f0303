//! Per-source connection rate limiting.
//!
//! One [`SourceRateLimiter`] is shared by all worker threads and checked at accept time. It is
//! lock-free and allocation-free after construction: a fixed count-min sketch of `AtomicU64`
//! slots, [`ROWS`] rows of a power-of-two width, each row indexed by an independently keyed hash
//! of the source. Each slot packs
//!
//! ```text
//!  63           40 39          20 19           0
//! ┌───────────────┬──────────────┬──────────────┐
//! │ window (24 b) │ current (20) │ previous (20)│
//! └───────────────┴──────────────┴──────────────┘
//! ```
//!
//! where `window = now / period` (truncated to 24 bits), `current` counts connections admitted
//! in that window and `previous` those of the window before. The rate is estimated as a sliding
//! window, `current + previous * (time left in the current window / period)`, and a connection is
//! admitted while that estimate is below `max`. Slots are updated with compare-and-swap loops; a
//! slot whose window is older than the previous one reads as empty.
//!
//! Sources share slots when their hashes collide, which can only make the limiter stricter, never
//! looser. As in a count-min sketch the estimate of a source is the minimum over its rows, so a
//! false refusal needs a collision in every row at once. The hash keys are random per process,
//! so which sources collide cannot be predicted from outside.
//!
//! Admission is decided on the row holding the minimum (a conditional CAS increment), then the
//! other rows are incremented. Concurrent admissions of the same source can therefore exceed
//! `max` by at most about one per racing thread, never more.
//!
//! Keys: an IPv4 source is limited by its full address; an IPv6 source by its /64 prefix,
//! since a single host or customer typically owns a whole /64 and could otherwise rotate
//! through addresses to evade the limit. IPv4-mapped IPv6 addresses count as IPv4.
//!
//! Limits: counts saturate at [`MAX_COUNT`], so a `max` above it behaves as [`MAX_COUNT`]. The
//! 24-bit window wraps after 2^24 periods; a slot left untouched for exactly a multiple of that
//! could be read as current, which can only cause a spurious refusal for one window.
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Rows of the count-min sketch (independent hashes).
pub const ROWS: usize = 2;
/// Default slots per row.
pub const DEFAULT_SLOTS_PER_ROW: usize = 1 << 15;
/// Largest count a slot can hold; limits above this act as this.
pub const MAX_COUNT: u32 = (1 << COUNT_BITS) - 1;

const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const WINDOW_BITS: u32 = 24;
const WINDOW_MASK: u64 = (1 << WINDOW_BITS) - 1;

/// Shared by all workers; lock-free.
pub struct SourceRateLimiter {
    max: u32,
    period: Duration,
    period_ns: u128,
    /// `ROWS * width` slots, row after row.
    slots: Box<[AtomicU64]>,
    width_mask: usize,
    hashers: [RandomState; ROWS],
}

impl std::fmt::Debug for SourceRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRateLimiter")
            .field("max", &self.max)
            .field("period", &self.period)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// One slot, unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    window: u64,
    current: u64,
    previous: u64,
}

impl Slot {
    fn unpack(v: u64) -> Slot {
        Slot {
            window: v >> (2 * COUNT_BITS),
            current: (v >> COUNT_BITS) & COUNT_MASK,
            previous: v & COUNT_MASK,
        }
    }

    fn pack(self) -> u64 {
        ((self.window & WINDOW_MASK) << (2 * COUNT_BITS))
            | ((self.current & COUNT_MASK) << COUNT_BITS)
            | (self.previous & COUNT_MASK)
    }

    /// The slot as seen from `window`, plus the nanoseconds elapsed in the slot's window that
    /// weigh the previous count. A slot already in a later window (another thread saw a slightly
    /// later clock) is taken as is, with its previous count fully weighted.
    fn at(self, window: u64, elapsed_ns: u128) -> (Slot, u128) {
        let ahead = self.window.wrapping_sub(window) & WINDOW_MASK;
        let behind = window.wrapping_sub(self.window) & WINDOW_MASK;
        if behind == 0 {
            (self, elapsed_ns)
        } else if behind == 1 {
            (
                Slot {
                    window,
                    current: 0,
                    previous: self.current,
                },
                elapsed_ns,
            )
        } else if (1..=2).contains(&ahead) {
            (self, 0)
        } else {
            (
                Slot {
                    window,
                    current: 0,
                    previous: 0,
                },
                elapsed_ns,
            )
        }
    }
}

impl SourceRateLimiter {
    /// At most `max` new connections per source per `period` (sliding). A zero `period` is
    /// treated as one nanosecond; `max == 0` refuses everything.
    pub fn new(max: u32, period: Duration) -> Self {
        Self::with_slots(max, period, DEFAULT_SLOTS_PER_ROW)
    }

    /// Like [`SourceRateLimiter::new`] with `slots_per_row` rounded up to a power of two
    /// (at least 1, at most 2^24). Memory is `ROWS * slots_per_row * 8` bytes.
    pub fn with_slots(max: u32, period: Duration, slots_per_row: usize) -> Self {
        let width = slots_per_row.clamp(1, 1 << 24).next_power_of_two();
        SourceRateLimiter {
            max,
            period,
            period_ns: period.as_nanos().max(1),
            slots: (0..ROWS * width).map(|_| AtomicU64::new(0)).collect(),
            width_mask: width - 1,
            hashers: [RandomState::new(), RandomState::new()],
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// Counts one new connection from `ip` at monotonic time `now`; false when over the limit.
    /// Refused connections are not counted.
    pub fn allow(&self, ip: IpAddr, now: Duration) -> bool {
        let limit = u128::from(self.max.min(MAX_COUNT));
        if limit == 0 {
            return false;
        }
        let now_ns = now.as_nanos();
        let window = ((now_ns / self.period_ns) as u64) & WINDOW_MASK;
        let elapsed = now_ns % self.period_ns;
        let key = source_key(ip);
        let idx: [usize; ROWS] = std::array::from_fn(|row| {
            let h = self.hashers[row].hash_one(key) as usize;
            row * (self.width_mask + 1) + (h & self.width_mask)
        });
        let estimate = |slot: Slot, elapsed: u128| -> u128 {
            let left = self.period_ns - elapsed.min(self.period_ns);
            // Rounded up: the limiter errs on the strict side.
            let weighted = (u128::from(slot.previous) * left).div_ceil(self.period_ns);
            u128::from(slot.current) + weighted
        };

        loop {
            // Find the row with the smallest estimate (ties: the first row, so that racing
            // admissions of one source mostly contend on the same slot).
            let mut gate: Option<(usize, u64, u128)> = None;
            for &i in &idx {
                let Some(cell) = self.slots.get(i) else {
                    return false;
                };
                let raw = cell.load(Ordering::Acquire);
                let (slot, el) = Slot::unpack(raw).at(window, elapsed);
                let est = estimate(slot, el);
                if gate.is_none_or(|(_, _, e)| est < e) {
                    gate = Some((i, raw, est));
                }
            }
            let Some((gi, raw, est)) = gate else {
                return false;
            };
            if est >= limit {
                return false;
            }
            let (slot, _) = Slot::unpack(raw).at(window, elapsed);
            let next = Slot {
                current: (slot.current + 1).min(COUNT_MASK),
                ..slot
            };
            let Some(cell) = self.slots.get(gi) else {
                return false;
            };
            if cell
                .compare_exchange_weak(raw, next.pack(), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            for &i in idx.iter().filter(|&&i| i != gi) {
                self.bump(i, window, elapsed);
            }
            return true;
        }
    }

    /// Unconditionally counts one connection in slot `i`.
    fn bump(&self, i: usize, window: u64, elapsed: u128) {
        let Some(cell) = self.slots.get(i) else {
            return;
        };
        let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |raw| {
            let (slot, _) = Slot::unpack(raw).at(window, elapsed);
            Some(
                Slot {
                    current: (slot.current + 1).min(COUNT_MASK),
                    ..slot
                }
                .pack(),
            )
        });
    }
}

/// The value a source is limited by: the full IPv4 address, or the /64 prefix of an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(u32),
    V6Prefix64(u64),
}

fn source_key(ip: IpAddr) -> SourceKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => SourceKey::V4(u32::from(v4)),
        IpAddr::V6(v6) => SourceKey::V6Prefix64((u128::from(v6) >> 64) as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::AtomicU32;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, n))
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn limiter_is_sync_and_send() {
        fn assert_sync<T: Sync + Send>() {}
        assert_sync::<SourceRateLimiter>();
    }

    #[test]
    fn under_limit_allowed_over_refused() {
        let rl = SourceRateLimiter::new(5, SEC);
        let t = Duration::from_millis(10);
        for _ in 0..5 {
            assert!(rl.allow(ip(1), t));
        }
        for _ in 0..10 {
            assert!(!rl.allow(ip(1), t));
        }
    }

    #[test]
    fn window_roll_over_resets() {
        let rl = SourceRateLimiter::new(10, SEC);
        for _ in 0..10 {
            assert!(rl.allow(ip(1), Duration::from_millis(100)));
        }
        assert!(!rl.allow(ip(1), Duration::from_millis(900)));
        // Two full periods later nothing of the old windows remains.
        for _ in 0..10 {
            assert!(rl.allow(ip(1), Duration::from_millis(2_100)));
        }
        assert!(!rl.allow(ip(1), Duration::from_millis(2_100)));
    }

    #[test]
    fn sliding_window_weighs_previous() {
        let rl = SourceRateLimiter::new(10, SEC);
        for _ in 0..10 {
            assert!(rl.allow(ip(1), Duration::from_millis(999)));
        }
        // 25% into the next window: the previous 10 weigh 7.5, rounded up to 8, so 2 more fit.
        let t = Duration::from_millis(1_250);
        assert!(rl.allow(ip(1), t));
        assert!(rl.allow(ip(1), t));
        assert!(!rl.allow(ip(1), t));
        // Late in the window the previous one has almost faded.
        let t = Duration::from_millis(1_950);
        let admitted = (0..20).filter(|_| rl.allow(ip(1), t)).count();
        assert_eq!(admitted, 7); // ceil(0.5) + 2 + 7 = 10
    }

    #[test]
    fn sources_are_independent() {
        let rl = SourceRateLimiter::new(3, SEC);
        let t = Duration::from_secs(5);
        for n in 0..=255u8 {
            for _ in 0..3 {
                assert!(rl.allow(ip(n), t), "source {n}");
            }
        }
        for n in 0..=255u8 {
            assert!(!rl.allow(ip(n), t));
        }
    }

    #[test]
    fn ipv6_keyed_by_slash_64() {
        let rl = SourceRateLimiter::new(4, SEC);
        let t = Duration::ZERO;
        let a = |host: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, host));
        for host in 0..4 {
            assert!(rl.allow(a(host), t));
        }
        // Another address of the same /64 shares the budget.
        assert!(!rl.allow(a(999), t));
        // A different /64 does not.
        assert!(rl.allow(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1)),
            t
        ));
        // IPv4-mapped counts as IPv4.
        let v4 = Ipv4Addr::new(203, 0, 113, 9);
        for _ in 0..4 {
            assert!(rl.allow(IpAddr::V6(v4.to_ipv6_mapped()), t));
        }
        assert!(!rl.allow(IpAddr::V4(v4), t));
    }

    #[test]
    fn degenerate_parameters() {
        let rl = SourceRateLimiter::new(0, SEC);
        assert!(!rl.allow(ip(1), Duration::ZERO));
        // Zero period: every nanosecond is a new window; nothing panics.
        let rl = SourceRateLimiter::new(1, Duration::ZERO);
        assert!(rl.allow(ip(1), Duration::from_nanos(10)));
        assert!(!rl.allow(ip(1), Duration::from_nanos(10)));
        assert!(rl.allow(ip(1), Duration::from_nanos(12)));
        // Extreme times and limits.
        let rl = SourceRateLimiter::with_slots(u32::MAX, Duration::MAX, 0);
        assert!(rl.allow(ip(1), Duration::MAX));
        let rl = SourceRateLimiter::new(2, SEC);
        assert!(rl.allow(ip(1), Duration::MAX));
        assert!(rl.allow(ip(1), Duration::MAX));
        assert!(!rl.allow(ip(1), Duration::MAX));
        // Time going slightly backwards (threads with different clocks) stays bounded.
        let rl = SourceRateLimiter::new(2, SEC);
        assert!(rl.allow(ip(1), Duration::from_millis(1_001)));
        assert!(rl.allow(ip(1), Duration::from_millis(999)));
        assert!(!rl.allow(ip(1), Duration::from_millis(999)));
        assert!(!rl.allow(ip(1), Duration::from_millis(1_001)));
    }

    #[test]
    fn tiny_table_collisions_only_make_it_stricter() {
        // One slot per row: every source shares it.
        let rl = SourceRateLimiter::with_slots(10, SEC, 1);
        let t = Duration::ZERO;
        let admitted = (0..50u8).filter(|&n| rl.allow(ip(n), t)).count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn concurrent_use_stays_within_limit() {
        let rl = SourceRateLimiter::new(1_000, SEC);
        let admitted = AtomicU32::new(0);
        let other = AtomicU32::new(0);
        let threads = 4;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for i in 0..2_000u32 {
                        let t = Duration::from_millis(100);
                        if rl.allow(ip(7), t) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        if rl.allow(ip((i % 50) as u8 + 100), t) {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let admitted = admitted.load(Ordering::Relaxed);
        assert!(
            (1_000..=1_000 + threads).contains(&admitted),
            "admitted {admitted}"
        );
        // 50 other sources with 160 attempts each, all under their own limit.
        assert_eq!(other.load(Ordering::Relaxed), 8_000);
    }
}
