//! Recording audit entries without slowing the work they describe: callers hand entries to a
//! writer task that stores them in batches. If the writer falls far behind (a flood of failed
//! attempts), entries beyond the queue are counted and reported in the log instead of blocking
//! devices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fleetgate_core::audit::{AuditEntry, Outcome};
use tokio::sync::{mpsc, oneshot};

use crate::Store;

const QUEUE: usize = 16_384;
const MAX_BATCH: usize = 1024;

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
        )
    }};
}

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Queued>,
    dropped: Arc<AtomicU64>,
}

/// What the writer task takes from its queue.
enum Queued {
    Entry(AuditEntry),
    /// Answered once every entry queued before it has been handed to the store.
    Flush(oneshot::Sender<()>),
}

impl AuditLog {
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Queued>(QUEUE);
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
                    if let Err(e) = store.append_audit(batch).await {
                        tracing::error!(error = %e, "audit entries could not be stored");
                    }
                }
                for done in flushed {
                    let _ = done.send(());
                }
            }
        });
        Self { tx, dropped: Arc::new(AtomicU64::new(0)) }
    }

    /// Records an entry and mirrors it to the structured log: refusals at `info` (what an
    /// operator watches for), successes at `debug` (a line per registration or connection is
    /// noise at fleet scale, and they are in the store), and any entry the store could not take
    /// at `warn`, so nothing is lost from both.
    pub fn record(&self, entry: AuditEntry) {
        if entry.outcome == Outcome::Failure {
            mirror!(tracing::Level::INFO, &entry);
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
}
