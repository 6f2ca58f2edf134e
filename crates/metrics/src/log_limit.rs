//! Log lines a stranger (or an outage) can cause once per request — a refused CONNECT, a bad
//! topic, a store failure — limited per call site: at most [`LINES_PER_MINUTE`] a minute from
//! each; the rest are counted, and the count rides on the next line that gets through
//! (`suppressed = N`). A flood then costs a few lines a minute instead of one per packet.
//! Refused authentications go through the audit trail's own per-source counting instead.
//!
//! Here, beside the metrics, because every layer logs: it is observability, process-wide.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

/// Lines per call site and minute.
pub const LINES_PER_MINUTE: u32 = 20;

static STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// One call site's allowance (a `static` made by [`log_limited!`](crate::log_limited)).
pub struct Limiter {
    /// Lines allowed a minute.
    per_minute: u32,
    /// The minute (since the process started) the count is for.
    minute: AtomicU64,
    in_minute: AtomicU32,
    suppressed: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    pub const fn new() -> Self {
        Self::per_minute(LINES_PER_MINUTE)
    }

    /// A limiter for lines that many sources share (each already bounded on its own), so the
    /// total stays bounded too.
    pub const fn per_minute(per_minute: u32) -> Self {
        Self { per_minute, minute: AtomicU64::new(0), in_minute: AtomicU32::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(lines suppressed since the last one logged)` if this line may be logged now.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(STARTED.elapsed().as_secs() / 60)
    }

    fn admit_at(&self, minute: u64) -> Option<u64> {
        // Racy at a minute's turn (two threads may both reset): a line more or less, never a
        // lost count of any size.
        if self.minute.swap(minute, Ordering::Relaxed) != minute {
            self.in_minute.store(0, Ordering::Relaxed);
        }
        if self.in_minute.fetch_add(1, Ordering::Relaxed) < self.per_minute {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::event!` at `$level` limited to [`LINES_PER_MINUTE`] lines a minute at this call
/// site; lines dropped since the last one are reported in its `suppressed` field.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::log_limit::Limiter = $crate::log_limit::Limiter::new();
        if let Some(suppressed) = LIMITER.admit() {
            tracing::event!($level, suppressed, $($arg)+);
        }
    }};
}

/// [`log_limited!`](crate::log_limited) at `info`.
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(tracing::Level::INFO, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_logs_its_allowance_a_minute_and_counts_the_rest() {
        let l = Limiter::new();
        for _ in 0..LINES_PER_MINUTE {
            assert_eq!(l.admit_at(5), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(l.admit_at(5), None);
        }
        // The next minute's first line carries the count.
        assert_eq!(l.admit_at(6), Some(100));
        assert_eq!(l.admit_at(6), Some(0));
        crate::info_limited!(reason = "a test", "the macro expands");
        let wide = Limiter::per_minute(3);
        assert_eq!((0..5).filter(|_| wide.admit_at(1).is_some()).count(), 3);
    }
}
