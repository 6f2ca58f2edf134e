//! Rate limits as Azure applies them: a token bucket per scope (an ID scope's registrations, a
//! hub's connects or messages). Pure: the caller passes the time.

use std::time::Duration;

/// A rate: `per_second` tokens refill continuously, up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// `n` per minute with a burst of one second's worth (at least 1), as Azure's per-minute
    /// quotas behave in practice.
    pub fn per_minute(n: u32) -> Self {
        let per_second = f64::from(n) / 60.0;
        Self { per_second, burst: per_second.max(1.0) }
    }

    pub fn per_second(n: u32) -> Self {
        Self { per_second: f64::from(n), burst: f64::from(n).max(1.0) }
    }
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    /// Seconds on the caller's clock at the last refill.
    last: f64,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: f64) -> Self {
        Self { rate, tokens: rate.burst, last: now }
    }

    fn refill(&mut self, now: f64) {
        let elapsed = (now - self.last).max(0.0);
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        self.last = now;
    }

    /// Takes a token if one is there; otherwise says how long until one will be.
    pub fn try_take(&mut self, now: f64) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.rate.per_second.max(f64::MIN_POSITIVE);
            Err(Duration::from_secs_f64(wait.min(3600.0)))
        }
    }
}

/// Whole seconds a throttled device is told to wait (`retry-after` is an integer, at least 1).
pub fn retry_after_secs(wait: Duration) -> u32 {
    (wait.as_secs_f64().ceil() as u32).clamp(1, 300)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_burst_then_the_rate() {
        let mut b = TokenBucket::new(Rate::per_second(10), 0.0);
        for _ in 0..10 {
            assert!(b.try_take(0.0).is_ok());
        }
        let wait = b.try_take(0.0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9);
        assert!(b.try_take(0.1).is_ok());
        assert!(b.try_take(0.1).is_err());
        // Idle time refills only up to the burst.
        for _ in 0..10 {
            assert!(b.try_take(100.0).is_ok());
        }
        assert!(b.try_take(100.0).is_err());
    }

    #[test]
    fn per_minute_quota() {
        let mut b = TokenBucket::new(Rate::per_minute(60), 0.0);
        assert!(b.try_take(0.0).is_ok());
        let wait = b.try_take(0.0).unwrap_err();
        assert_eq!(retry_after_secs(wait), 1);
        assert!(b.try_take(1.0).is_ok());
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(10_000)), 300);
    }
}
