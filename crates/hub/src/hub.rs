//! [`Hub`]: every hub decision, independent of the wire. What it decides is split by concern:
//! device authentication (`authentication`), live connections (`connections`), telemetry,
//! twins, direct methods, cloud-to-device messages and the device registry; the service API
//! renders and parses Azure's JSON at the edge.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_core::throttle::{Rate, TokenBucket};
use fleetgate_core::time::Timestamp;
use fleetgate_core::AzureError;
use fleetgate_store::{LinkedHub, Store};

use crate::config::HubConfig;
use crate::errors::store_err;
use crate::methods::{MethodListeners, PendingCalls};
use crate::sessions::{self, Sessions};
use crate::telemetry::EventWriter;

pub struct Hub {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: HubConfig,
    pub(crate) sessions: Sessions,
    pub(crate) events: EventWriter,
    pub(crate) methods: PendingCalls,
    /// Method calls waiting for their device to connect (`connectTimeoutInSeconds`).
    pub(crate) method_listeners: MethodListeners,
    /// Last activity per device (ticks; 0 = none), kept in memory (Azure reports it eventually
    /// consistent too). Each connection holds its device's entry.
    activity: Mutex<HashMap<(String, String), Arc<AtomicI64>>>,
    /// Per-hub connect and message quotas, keyed by (hub, "connect" | "message").
    throttles: Mutex<HashMap<(String, &'static str), TokenBucket>>,
    started: std::time::Instant,
    /// Device connections and service-side changes.
    pub(crate) audit: fleetgate_store::AuditLog,
}

impl Hub {
    pub fn new(store: Arc<dyn Store>, config: HubConfig) -> Self {
        let audit = fleetgate_store::AuditLog::start(store.clone());
        Self::with_audit(store, config, audit)
    }

    /// [`Hub::new`] recording into `audit`, which the server shares with the provisioning
    /// service so that refusals are counted per source whichever service refused them.
    pub fn with_audit(store: Arc<dyn Store>, config: HubConfig, audit: fleetgate_store::AuditLog) -> Self {
        let events = EventWriter::start(store.clone());
        Self {
            store,
            config,
            sessions: Sessions::default(),
            events,
            methods: PendingCalls::default(),
            method_listeners: MethodListeners::default(),
            activity: Mutex::new(HashMap::new()),
            throttles: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            audit,
        }
    }

    fn take(&self, hub: &str, kind: &'static str, rate: Rate) -> Result<(), Duration> {
        let now = self.started.elapsed().as_secs_f64();
        let mut map = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((hub.to_ascii_lowercase(), kind)).or_insert_with(|| TokenBucket::new(rate, now)).try_take(now)
    }

    /// Admits one device connect under the hub's quota.
    pub fn admit_connect(&self, hub: &str) -> bool {
        match self.config.connect_rate {
            None => true,
            Some(rate) => {
                let ok = self.take(hub, "connect", rate).is_ok();
                if !ok {
                    // Debug: counted in the throttled metric; a line per refused connect would be a flood.
                    tracing::debug!(hub = %hub, "device connect throttled");
                    fleetgate_metrics::METRICS.throttle("connect");
                }
                ok
            }
        }
    }

    /// Waits until the hub's message quota admits one more message.
    pub(crate) async fn admit_message(&self, hub: &str) {
        let Some(rate) = self.config.message_rate else { return };
        let mut counted = false;
        while let Err(wait) = self.take(hub, "message", rate) {
            if !std::mem::replace(&mut counted, true) {
                fleetgate_metrics::METRICS.throttle("message");
            }
            tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
        }
    }

    /// The device's last-activity cell, shared by its connections and [`Hub::device_state`].
    pub(crate) fn activity_of(&self, hub: &str, device_id: &str) -> Arc<AtomicI64> {
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sessions::key(hub, device_id))
            .or_default()
            .clone()
    }

    /// When the device was last active since the server started, if it was.
    pub(crate) fn last_activity(&self, hub: &str, device_id: &str) -> Option<Timestamp> {
        let activity = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        let ticks = activity.get(&sessions::key(hub, device_id))?.load(std::sync::atomic::Ordering::Relaxed);
        (ticks != 0).then(|| Timestamp::from_ticks(ticks))
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Whether telemetry can be taken: `false` while the event log's last append failed.
    pub fn telemetry_healthy(&self) -> bool {
        self.events.healthy()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn audit(&self) -> &fleetgate_store::AuditLog {
        &self.audit
    }

    pub async fn hub_named(&self, host: &str) -> Result<Option<LinkedHub>, AzureError> {
        let hubs = self.store.hubs().await.map_err(store_err)?;
        Ok(hubs.into_iter().find(|h| h.host_name.eq_ignore_ascii_case(host)))
    }
}
