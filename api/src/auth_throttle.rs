//! Password guessing: failed basic-auth attempts counted per source address. A source with `limit` failures
//! within `window` (counted from its first failure) gets 429 with `Retry-After` until that window ends, whatever
//! it sends; other sources are never affected, so the right credentials from another address always work.
//!
//! A source is the TCP peer's IPv4 address, or its IPv6 /64 (one host usually holds a whole /64). The table holds
//! at most [`MAX_SOURCES`]: when full, windows that ended are dropped first, then the tenth whose windows started
//! earliest, so a spray of addresses costs bounded memory and little time.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Most sources tracked at once (about 50 bytes each).
pub const MAX_SOURCES: usize = 10_000;
pub const DEFAULT_LIMIT: u32 = 20;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct AuthThrottle {
    limit: u32,
    window: Duration,
    sources: Mutex<HashMap<IpAddr, Failures>>,
    /// When the last block to end ends, in ms after `created`: past it no source is blocked, and the check on
    /// every authenticated request skips the lock.
    blocks_end_ms: AtomicU64,
    created: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT, DEFAULT_WINDOW)
    }
}

impl AuthThrottle {
    /// `limit` failures per `window` per source (a limit of 0 turns throttling off).
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            sources: Mutex::new(HashMap::new()),
            blocks_end_ms: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    fn ms_since_created(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.created).as_millis()).unwrap_or(u64::MAX)
    }

    /// `Some(how long)` while `source` is refused.
    pub fn blocked_for(&self, source: IpAddr) -> Option<Duration> {
        let no_block_left =
            self.ms_since_created(Instant::now()) >= self.blocks_end_ms.load(Ordering::Acquire);
        if self.limit == 0 || no_block_left {
            return None;
        }
        let key = source_key(source);
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let failures = sources.get(&key)?;
        let left = self.window.checked_sub(failures.since.elapsed())?;
        (failures.count >= self.limit && !left.is_zero()).then_some(left)
    }

    /// Records a failed attempt from `source`.
    pub fn record_failure(&self, source: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let key = source_key(source);
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if !sources.contains_key(&key) && sources.len() >= MAX_SOURCES {
            let window = self.window;
            sources.retain(|_, f| now.duration_since(f.since) < window);
            if sources.len() >= MAX_SOURCES {
                // Evict the earliest tenth at once, so a spray costs O(1) per address on average.
                let mut starts: Vec<Instant> = sources.values().map(|f| f.since).collect();
                let (_, cutoff, _) = starts.select_nth_unstable(MAX_SOURCES / 10);
                let cutoff = *cutoff;
                sources.retain(|_, f| f.since > cutoff);
            }
        }
        let entry = sources.entry(key).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now.duration_since(entry.since) >= self.window {
            *entry = Failures {
                since: now,
                count: 0,
            };
        }
        entry.count = entry.count.saturating_add(1);
        if entry.count >= self.limit {
            let ends = self
                .ms_since_created(entry.since + self.window)
                .saturating_add(1);
            self.blocks_end_ms.fetch_max(ends, Ordering::AcqRel);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.lock().unwrap().len()
    }
}

/// IPv4 (and IPv4-mapped IPv6) as is; other IPv6 addresses by their /64.
fn source_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn blocks_a_source_after_the_limit_and_only_it() {
        let throttle = AuthThrottle::new(3, Duration::from_secs(60));
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        for _ in 0..2 {
            throttle.record_failure(a);
        }
        assert_eq!(throttle.blocked_for(a), None);
        throttle.record_failure(a);
        assert!(
            throttle
                .blocked_for(a)
                .is_some_and(|d| d <= Duration::from_secs(60))
        );
        assert_eq!(throttle.blocked_for(b), None);
    }

    #[test]
    fn ipv6_hosts_count_by_their_64() {
        let throttle = AuthThrottle::new(2, Duration::from_secs(60));
        let one: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let other: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        throttle.record_failure(one.into());
        throttle.record_failure(other.into());
        assert!(throttle.blocked_for(one.into()).is_some());
        assert_eq!(throttle.blocked_for(elsewhere.into()), None);
    }

    #[test]
    fn a_spray_of_addresses_stays_bounded() {
        let throttle = AuthThrottle::new(2, Duration::from_secs(60));
        let first = IpAddr::V4(Ipv4Addr::from(1u32));
        for i in 1..=(MAX_SOURCES as u32 * 2) {
            throttle.record_failure(IpAddr::V4(Ipv4Addr::from(i)));
        }
        assert!(throttle.tracked() <= MAX_SOURCES && throttle.tracked() > MAX_SOURCES / 2);
        // The newest sources are kept, the earliest evicted.
        assert_eq!(throttle.blocked_for(first), None);
        let last = IpAddr::V4(Ipv4Addr::from(MAX_SOURCES as u32 * 2));
        throttle.record_failure(last);
        assert!(throttle.blocked_for(last).is_some());
    }
}
