//! Recording audit entries without slowing the work they describe: callers hand entries to a
//! writer task that stores them in batches. If the writer falls far behind, entries beyond the
//! queue are counted and reported in the log instead of blocking devices.
//!
//! Refused authentications go through [`AuditLog::refused`]: per source address, the first of a
//! window is recorded (and logged), the rest are counted and reported by one summary entry when
//! the window closes, and a source with too many refusals is turned away for a while (see
//! [`fleetgate_core::refusals`]). The trail is kept for a retention period and under a row cap,
//! oldest first, by a periodic task.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetgate_core::audit::{AuditEntry, Outcome};
use fleetgate_core::refusals::{Record, RefusalLimits, RefusalTracker, Summary};
use fleetgate_core::time::Timestamp;
use tokio::sync::{mpsc, oneshot};

use crate::Store;

const QUEUE: usize = 16_384;

/// Failure entries mirrored to the log a minute, all sources together.
pub const FAILURE_LINES_PER_MINUTE: u32 = 600;
static FAILURE_LINES: fleetgate_metrics::log_limit::Limiter =
    fleetgate_metrics::log_limit::Limiter::per_minute(FAILURE_LINES_PER_MINUTE);
const MAX_BATCH: usize = 1024;

/// How long the audit trail is kept and how large it may grow; how refusals are counted.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditOptions {
    /// Entries older than this are deleted (Azure keeps diagnostic logs as long as configured;
    /// 90 days is a common compliance floor).
    pub retention: Duration,
    /// At most this many entries are kept; the oldest go first (about 300 bytes each).
    pub max_rows: u64,
    /// How often the retention and the cap are applied.
    pub prune_every: Duration,
    pub refusals: RefusalLimits,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(90 * 24 * 3600),
            max_rows: 1_000_000,
            prune_every: Duration::from_secs(600),
            refusals: RefusalLimits::default(),
        }
    }
}

/// One audit entry as a log event at `$level`.
macro_rules! mirror {
    ($level:expr, $entry:expr) => {{
        let e: &AuditEntry = $entry;
        tracing::event!(
            target: "audit",
            $level,
            category = ?e.category,
            operation = %e.operation,
            actor = %e.actor,
            target_id = e.target.as_deref().unwrap_or(""),
            outcome = ?e.outcome,
            reason = e.reason.as_deref().unwrap_or(""),
            source = e.source.as_deref().unwrap_or(""),
        )
    }};
}

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Queued>,
    dropped: Arc<AtomicU64>,
    refusals: Arc<Mutex<RefusalTracker>>,
    /// The refusal tracker's clock.
    started: Instant,
}

/// What the writer task takes from its queue.
enum Queued {
    Entry(AuditEntry),
    /// Answered once every entry queued before it has been handed to the store.
    Flush(oneshot::Sender<()>),
}

impl AuditLog {
    /// An audit log with the default retention and refusal limits.
    pub fn start(store: Arc<dyn Store>) -> Self {
        Self::start_with(store, AuditOptions::default())
    }

    pub fn start_with(store: Arc<dyn Store>, options: AuditOptions) -> Self {
        let (tx, mut rx) = mpsc::channel::<Queued>(QUEUE);
        let writer = store.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = Vec::new();
                let mut flushed = Vec::new();
                let mut next = Some(first);
                while let Some(queued) = next {
                    match queued {
                        Queued::Entry(e) => batch.push(e),
                        Queued::Flush(done) => flushed.push(done),
                    }
                    next = if batch.len() < MAX_BATCH { rx.try_recv().ok() } else { None };
                }
                if !batch.is_empty() {
                    if let Err(e) = writer.append_audit(batch).await {
                        tracing::error!(error = %e, "audit entries could not be stored");
                    }
                }
                for done in flushed {
                    let _ = done.send(());
                }
            }
        });
        let log = Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            refusals: Arc::new(Mutex::new(RefusalTracker::new(options.refusals))),
            started: Instant::now(),
        };
        tokio::spawn(summarize(log.clone(), options.refusals.window));
        tokio::spawn(prune(Arc::downgrade(&store), options, log.tx.downgrade()));
        log
    }

    /// Records an entry and mirrors it to the structured log: refusals at `info` (what an
    /// operator watches for), successes at `debug` (a line per registration or connection is
    /// noise at fleet scale, and they are in the store), and any entry the store could not take
    /// at `warn`, so nothing is lost from both.
    pub fn record(&self, entry: AuditEntry) {
        if entry.outcome == Outcome::Failure {
            // Each source's refusals are bounded by the per-source counting; many sources (a
            // botnet, an IPv6 range) are bounded here: the store keeps every entry recorded.
            if let Some(suppressed) = FAILURE_LINES.admit() {
                if suppressed > 0 {
                    tracing::warn!(target: "audit", suppressed, "failure lines suppressed (the audit trail has them)");
                }
                mirror!(tracing::Level::INFO, &entry);
            }
        } else {
            mirror!(tracing::Level::DEBUG, &entry);
        }
        if let Err(e) = self.tx.try_send(Queued::Entry(entry)) {
            if let Queued::Entry(entry) = e.into_inner() {
                if entry.outcome != Outcome::Failure {
                    mirror!(tracing::Level::WARN, &entry);
                }
            }
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "audit queue full; entries dropped from the store (still logged)");
            }
        }
    }

    /// Resolves once every entry recorded before the call has been stored (or its failure
    /// logged): a stopping server waits for it before its final checkpoint, so the last
    /// requests' entries are in `telemetry.db` itself.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Queued::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, RefusalTracker> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request from `source` may have its credentials checked now, or `Err(wait)`:
    /// the source failed too often and is turned away for `wait` (answer 429 / CONNACK 3).
    /// Requests without a source address (in-process callers) are always admitted.
    pub fn admit(&self, source: Option<IpAddr>) -> Result<(), Duration> {
        let Some(ip) = source else { return Ok(()) };
        let now = self.now();
        let result = self.tracker().admit(ip, now);
        if result.is_err() {
            fleetgate_metrics::METRICS.throttle("auth_failures");
        }
        result
    }

    /// Records a refused authentication from `source`: the first from that source in a window in
    /// full (store and log), the others only counted until the window's summary. Without a
    /// source (an in-process caller) it is recorded in full.
    ///
    /// Returns whether it was recorded in full. The entry's log line is the audit mirror's: a
    /// caller logs no line of its own about the refusal.
    pub fn refused(&self, source: Option<IpAddr>, entry: AuditEntry) -> bool {
        let Some(ip) = source else {
            self.record(entry);
            return true;
        };
        let now = self.now();
        let decision = self.tracker().refused(ip, entry.category, now);
        fleetgate_metrics::METRICS.auth_refused();
        if decision == Record::Full {
            self.record(entry.source(ip));
        }
        decision == Record::Full
    }

    /// Records the summaries of the windows that have closed.
    fn record_summaries(&self) {
        let now = self.now();
        let summaries = self.tracker().close(now);
        for s in summaries {
            self.record(summary_entry(&s));
        }
    }
}

/// "N more refusals from X" for a closed window.
fn summary_entry(s: &Summary) -> AuditEntry {
    let from = s.source.map_or_else(|| "other sources".to_owned(), |ip| ip.to_string());
    let mut reason = format!("{} more refusals from {from}", s.unrecorded);
    if s.turned_away > 0 {
        reason.push_str(&format!(" ({} turned away without a credential check)", s.turned_away));
    }
    let mut e = AuditEntry::new(s.category, "refusals", &from, Outcome::Failure).reason(reason);
    if let Some(ip) = s.source {
        e = e.source(ip);
    }
    e
}

/// Closes refusal windows as they end; stops when every handle to the log is gone.
async fn summarize(log: AuditLog, window: Duration) {
    let mut tick = tokio::time::interval((window / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tracker = Arc::downgrade(&log.refusals);
    let (tx, started, dropped) = (log.tx.downgrade(), log.started, log.dropped.clone());
    drop(log);
    loop {
        tick.tick().await;
        let (Some(refusals), Some(tx)) = (tracker.upgrade(), tx.upgrade()) else { return };
        AuditLog { tx, dropped: dropped.clone(), refusals, started }.record_summaries();
    }
}

/// Applies the retention period and the row cap now and then; stops with the log. Holds the
/// store only while pruning: a stopped server's store must close (a restarted one reopens it).
async fn prune(store: std::sync::Weak<dyn Store>, options: AuditOptions, alive: mpsc::WeakSender<Queued>) {
    let mut tick = tokio::time::interval(options.prune_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(store), Some(_)) = (store.upgrade(), alive.upgrade()) else { return };
        let cutoff = Timestamp::from_unix_seconds(
            Timestamp::now()
                .unix_seconds()
                .saturating_sub(i64::try_from(options.retention.as_secs()).unwrap_or(i64::MAX)),
        );
        match store.prune_audit(&cutoff.to_azure_string(), options.max_rows).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "audit trail pruned (retention and row cap)"),
            Err(e) => tracing::warn!(error = %e, "audit trail could not be pruned"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_core::audit::AuditCategory;

    #[test]
    fn summaries_say_how_many_and_from_where() {
        let s = Summary {
            source: Some("192.0.2.9".parse().unwrap()),
            category: AuditCategory::ServiceOperations,
            unrecorded: 41,
            turned_away: 7,
        };
        let e = summary_entry(&s);
        assert_eq!(
            e.reason.as_deref(),
            Some("41 more refusals from 192.0.2.9 (7 turned away without a credential check)")
        );
        assert_eq!((e.actor.as_str(), e.source.as_deref()), ("192.0.2.9", Some("192.0.2.9")));
        let e = summary_entry(&Summary { source: None, turned_away: 0, ..s });
        assert_eq!(e.reason.as_deref(), Some("41 more refusals from other sources"));
    }
}
