//! Refused authentications, counted per source address: which refusals are recorded one by one
//! (the first few of each source in a window), how many more there were (one summary when the window
//! closes), and which sources are turned away without a credential check for a while (too many
//! failures in one window). Pure: the caller passes the time, in seconds on its own clock.
//!
//! Why: a stranger can send refused requests as fast as the network allows, and each one used to
//! cost an audit row and a log line (584,200 of each in 10 s in a hostile test). Recording the
//! first few per source and window keeps who tried what; the count keeps how much.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::audit::AuditCategory;

/// The limits, as `fleetgate serve` flags set them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefusalLimits {
    /// How long a source's window lasts, from its first refusal.
    pub window: Duration,
    /// Refusals within one window after which the source is turned away; 0 never turns away.
    pub max_failures: u32,
    /// How long a source is turned away (answered "retry later" without a credential check).
    pub backoff: Duration,
    /// Refusals per source and window recorded in full (which devices fail, behind one NAT
    /// address too); the rest are counted.
    pub recorded: u32,
    /// Sources tracked at once; refusals from further sources share one count.
    pub max_sources: usize,
}

impl Default for RefusalLimits {
    /// A minute's window; 100 refusals in it turn the source away for a minute. An SDK whose
    /// credential is wrong retries at most every few seconds (Python every 10 s, the others back
    /// off), so even a NAT address with a dozen broken devices stays under 100 a minute; a source
    /// that does trip it delays its good devices by a minute, and they retry by themselves
    /// (429 and CONNACK 3 are transient to every SDK). Credentials are 256-bit keys or
    /// certificates, so this is not about guessing: it bounds the work a stranger can cause.
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            max_failures: 100,
            backoff: Duration::from_secs(60),
            recorded: 10,
            max_sources: 100_000,
        }
    }
}

/// The address refusals are counted under: an IPv6 client gets a /64 (one subscriber's usual
/// share, which it can spread itself over), an IPv4-mapped address counts as its IPv4 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Record it in full: one of the first `recorded` from its source in this window.
    Full,
    /// Only count it; the window's summary reports it.
    Counted,
}

/// Refusals of one closed window that were counted but not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The source (as [`source_key`] makes it), or `None` for the sources beyond `max_sources`.
    pub source: Option<IpAddr>,
    pub category: AuditCategory,
    pub unrecorded: u64,
    /// How many of them were turned away without a credential check.
    pub turned_away: u64,
}

#[derive(Debug, Clone)]
struct Window {
    start: f64,
    failures: u32,
    category: AuditCategory,
    unrecorded: u64,
    turned_away: u64,
    blocked_until: f64,
}

#[derive(Debug, Clone)]
pub struct RefusalTracker {
    limits: RefusalLimits,
    sources: HashMap<IpAddr, Window>,
    /// Counted refusals of untracked sources (the table was full).
    overflow: Option<Window>,
    /// Summaries of windows that ended while a new refusal arrived, until the next `close`.
    closed: Vec<Summary>,
    /// When a full table may next be swept for ended windows to make room: a sweep visits every
    /// source, so one per refusal from an untracked source would let a stranger who filled the
    /// table make each refusal cost a scan of it, under the lock every connection's `admit` takes.
    next_sweep: f64,
    /// Sweeps made to make room (for tests).
    sweeps: u64,
}

/// How often, at most, a full table is swept to make room (seconds).
const SWEEP_EVERY: f64 = 1.0;

impl Window {
    fn new(now: f64, category: AuditCategory) -> Self {
        Self { start: now, failures: 0, category, unrecorded: 0, turned_away: 0, blocked_until: f64::MIN }
    }

    fn summary(&self, source: Option<IpAddr>) -> Option<Summary> {
        (self.unrecorded > 0).then_some(Summary {
            source,
            category: self.category,
            unrecorded: self.unrecorded,
            turned_away: self.turned_away,
        })
    }
}

impl RefusalTracker {
    pub fn new(limits: RefusalLimits) -> Self {
        Self { limits, sources: HashMap::new(), overflow: None, closed: Vec::new(), next_sweep: f64::MIN, sweeps: 0 }
    }

    pub fn limits(&self) -> &RefusalLimits {
        &self.limits
    }

    fn window_secs(&self) -> f64 {
        self.limits.window.as_secs_f64()
    }

    /// Whether `source` may have its credentials checked now; `Err(wait)` while it is turned
    /// away. A turned-away request is counted in the window's summary.
    pub fn admit(&mut self, source: IpAddr, now: f64) -> Result<(), Duration> {
        let key = source_key(source);
        let Some(w) = self.sources.get_mut(&key) else { return Ok(()) };
        if now < w.blocked_until {
            w.unrecorded += 1;
            w.turned_away += 1;
            return Err(Duration::from_secs_f64(w.blocked_until - now));
        }
        Ok(())
    }

    /// Counts a refused authentication from `source`; says whether to record it in full.
    pub fn refused(&mut self, source: IpAddr, category: AuditCategory, now: f64) -> Record {
        let key = source_key(source);
        let window = self.window_secs();
        if let Some(w) = self.sources.get(&key) {
            if now >= w.start + window && now >= w.blocked_until {
                // Its window is over: report it, and this refusal opens the next one.
                if let Some(s) = w.summary(Some(key)) {
                    self.closed.push(s);
                }
                self.sources.remove(&key);
            }
        }
        if !self.sources.contains_key(&key) && self.sources.len() >= self.limits.max_sources && now >= self.next_sweep {
            self.close_windows(now, false);
            self.sweeps += 1;
            self.next_sweep = now + SWEEP_EVERY;
        }
        if !self.sources.contains_key(&key) && self.sources.len() >= self.limits.max_sources {
            let w = self.overflow.get_or_insert_with(|| Window::new(now, category));
            w.unrecorded += 1;
            return Record::Counted;
        }
        let limits = self.limits;
        let w = self.sources.entry(key).or_insert_with(|| Window::new(now, category));
        w.failures = w.failures.saturating_add(1);
        if limits.max_failures > 0 && w.failures >= limits.max_failures && w.blocked_until < now {
            w.blocked_until = now + limits.backoff.as_secs_f64();
        }
        if w.failures <= limits.recorded {
            Record::Full
        } else {
            w.unrecorded += 1;
            Record::Counted
        }
    }

    /// Ends the windows that are over (and whose backoff has passed) and returns their
    /// summaries, with those of windows ended since the last call.
    pub fn close(&mut self, now: f64) -> Vec<Summary> {
        self.close_windows(now, true);
        std::mem::take(&mut self.closed)
    }

    fn close_windows(&mut self, now: f64, with_overflow: bool) {
        let window = self.window_secs();
        let closed = &mut self.closed;
        self.sources.retain(|key, w| {
            let over = now >= w.start + window && now >= w.blocked_until;
            if over {
                closed.extend(w.summary(Some(*key)));
            }
            !over
        });
        if with_overflow && self.overflow.as_ref().is_some_and(|w| now >= w.start + window) {
            closed.extend(self.overflow.take().and_then(|w| w.summary(None)));
        }
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: AuditCategory = AuditCategory::DeviceOperations;

    fn limits(max_failures: u32) -> RefusalLimits {
        RefusalLimits {
            window: Duration::from_secs(60),
            max_failures,
            backoff: Duration::from_secs(30),
            recorded: 1,
            max_sources: 3,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_refusal_recorded_the_rest_summarized_when_the_window_closes() {
        let mut t = RefusalTracker::new(limits(0));
        let a = ip("192.0.2.1");
        assert_eq!(t.refused(a, DEV, 0.0), Record::Full);
        for i in 0..999 {
            assert_eq!(t.refused(a, DEV, 1.0 + f64::from(i) * 0.01), Record::Counted);
        }
        // Another source has its own window.
        assert_eq!(t.refused(ip("192.0.2.2"), DEV, 5.0), Record::Full);
        assert!(t.close(59.0).is_empty());
        let s = t.close(60.0);
        assert_eq!(s, vec![Summary { source: Some(a), category: DEV, unrecorded: 999, turned_away: 0 }]);
        // The other window had nothing unrecorded: no summary, and it is forgotten.
        assert!(t.close(65.0).is_empty());
        assert_eq!(t.tracked(), 0);
        // A new window records its first refusal again.
        assert_eq!(t.refused(a, DEV, 61.0), Record::Full);
    }

    #[test]
    fn the_first_few_of_a_window_are_recorded() {
        let mut t = RefusalTracker::new(RefusalLimits { recorded: 3, ..limits(0) });
        let a = ip("192.0.2.1");
        let got: Vec<_> = (0..5).map(|i| t.refused(a, DEV, f64::from(i))).collect();
        assert_eq!(got, [Record::Full, Record::Full, Record::Full, Record::Counted, Record::Counted]);
        assert_eq!(t.close(60.0)[0].unrecorded, 2);
    }

    #[test]
    fn a_refusal_after_the_window_reports_it_at_the_next_close() {
        let mut t = RefusalTracker::new(limits(0));
        let a = ip("192.0.2.1");
        t.refused(a, DEV, 0.0);
        t.refused(a, DEV, 1.0);
        assert_eq!(t.refused(a, DEV, 70.0), Record::Full);
        assert_eq!(t.close(71.0).iter().map(|s| s.unrecorded).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn too_many_failures_turn_a_source_away_for_the_backoff() {
        let mut t = RefusalTracker::new(limits(5));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for i in 0..4 {
            assert!(t.admit(a, f64::from(i)).is_ok());
            t.refused(a, DEV, f64::from(i));
        }
        assert!(t.admit(a, 4.0).is_ok());
        t.refused(a, DEV, 4.0);
        let wait = t.admit(a, 10.0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(24));
        assert!(t.admit(b, 10.0).is_ok(), "other sources are not affected");
        assert!(t.admit(a, 33.9).is_err());
        assert!(t.admit(a, 34.0).is_ok(), "the backoff ends");
        // Still inside the minute: the window goes on, and the next refusal turns it away again.
        t.refused(a, DEV, 35.0);
        assert!(t.admit(a, 36.0).is_err());
        let s = t.close(200.0);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].unrecorded, s[0].turned_away), (4 + 2 + 1 + 1, 3));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let mut t = RefusalTracker::new(limits(2));
        t.refused(ip("2001:db8:1:2::1"), DEV, 0.0);
        t.refused(ip("2001:db8:1:2:ffff::9"), DEV, 0.0);
        assert!(t.admit(ip("2001:db8:1:2::77"), 1.0).is_err());
        assert!(t.admit(ip("2001:db8:1:3::1"), 1.0).is_ok());
        assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn sources_beyond_the_table_share_one_count() {
        let mut t = RefusalTracker::new(limits(0));
        for i in 1..=3 {
            assert_eq!(t.refused(ip(&format!("192.0.2.{i}")), DEV, 0.0), Record::Full);
        }
        for i in 4..=10 {
            assert_eq!(t.refused(ip(&format!("192.0.2.{i}")), DEV, 1.0), Record::Counted);
        }
        assert_eq!(t.tracked(), 3);
        let s = t.close(61.0);
        assert_eq!(s, vec![Summary { source: None, category: DEV, unrecorded: 7, turned_away: 0 }]);
        // Expired windows make room.
        assert_eq!(t.refused(ip("192.0.2.11"), DEV, 62.0), Record::Full);
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        let mut t = RefusalTracker::new(limits(0));
        for i in 1..=3 {
            t.refused(ip(&format!("192.0.2.{i}")), DEV, 0.0);
        }
        // Refusals from ever new sources while the table is full: each would sweep it.
        for i in 0..1000u32 {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(t.refused(source, DEV, 1.0 + f64::from(i) * 0.0001), Record::Counted);
        }
        assert_eq!(t.sweeps, 1);
        // A second later the table is swept again, and ended windows make room.
        assert_eq!(t.refused(ip("192.0.2.99"), DEV, 61.5), Record::Full);
        assert_eq!(t.sweeps, 2);
    }
}
