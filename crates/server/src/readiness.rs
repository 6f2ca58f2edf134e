//! What `/readyz` answers: ready means "can take a registration now". That needs more than a
//! read that answers: a small durable write (a full disk, a frozen or read-only filesystem and
//! I/O errors show up there, not in reads of cached pages), the registry file intact (SQLite's
//! `quick_check`, which reads the whole file, so it runs in the background now and then and its
//! result is kept), and the telemetry log taking appends.
//!
//! The write probe's result is kept for a second: `/readyz` needs no credentials, and a flood of
//! it must not become a flood of fsyncs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetgate_hub::Hub;
use fleetgate_store::Store;
use tokio::sync::watch;

/// How long a write probe's result is reused.
const PROBE_FRESH_FOR: Duration = Duration::from_secs(1);
/// How long a write probe may take before the store counts as not ready (a frozen filesystem
/// blocks rather than fails).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the registry's integrity is checked.
const INTEGRITY_EVERY: Duration = Duration::from_secs(600);

pub struct Readiness {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    /// The last write probe: when, and what it found. Held across the probe, so concurrent
    /// callers share one.
    probe: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    /// The last integrity check's finding (`Ok` until the first one completes).
    integrity: Mutex<Result<(), String>>,
}

impl Readiness {
    /// Starts the periodic integrity check (the first one at once); it stops at shutdown.
    pub fn start(store: Arc<dyn Store>, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) -> Arc<Self> {
        let me = Arc::new(Self { store, hub, probe: tokio::sync::Mutex::new(None), integrity: Mutex::new(Ok(())) });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                // The answer to `/readyz` names the check, not the store's own words (file names,
                // pages): those are for the operator's log, not for whoever asks.
                let found = me.store.integrity_check().await.map_err(|e| {
                    tracing::error!(error = %e, "the registry failed its integrity check; not ready");
                    "the registry failed its integrity check (see the log)".to_owned()
                });
                *me.integrity.lock().unwrap_or_else(|p| p.into_inner()) = found;
                drop(me);
                tokio::select! {
                    _ = tokio::time::sleep(INTEGRITY_EVERY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
        me
    }

    /// `Ok` when a registration could be taken now; otherwise why not (for the operator).
    pub async fn check(&self) -> Result<(), String> {
        self.integrity.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        if !self.hub.telemetry_healthy() {
            return Err("telemetry appends are failing".into());
        }
        let mut probe = self.probe.lock().await;
        if let Some((at, found)) = probe.as_ref() {
            if at.elapsed() < PROBE_FRESH_FOR {
                return found.clone();
            }
        }
        let found = self.probe_store().await;
        if let Err(e) = &found {
            tracing::warn!(error = %e, "store not ready");
        }
        *probe = Some((Instant::now(), found.clone()));
        found
    }

    async fn probe_store(&self) -> Result<(), String> {
        let checks = async {
            match self.store.setting("id_scope").await {
                Ok(Some(_)) => {}
                Ok(None) => return Err("the instance has no ID scope".to_owned()),
                Err(e) => {
                    tracing::warn!(error = %e, "registry read failed");
                    return Err("the registry cannot be read (see the log)".to_owned());
                }
            }
            self.store.write_probe().await.map_err(|e| {
                tracing::warn!(error = %e, "registry write failed");
                "the registry cannot be written (see the log)".to_owned()
            })
        };
        tokio::time::timeout(PROBE_TIMEOUT, checks)
            .await
            .unwrap_or_else(|_| Err("the store did not answer in time".into()))
    }
}
