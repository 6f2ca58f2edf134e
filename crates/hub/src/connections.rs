//! Live device connections: a session per authenticated connection, and the MQTT
//! subscriptions a persistent session keeps between them.

use fleetgate_core::time::Timestamp;
use fleetgate_core::AzureError;
use serde_json::{json, Value};

use crate::authentication::HubDevice;
use crate::errors::store_err;
use crate::mqtt::Subscription;
use crate::sessions::SessionHandle;
use crate::Hub;

impl Hub {
    /// Marks the device connected; the returned handle receives what the service sends it.
    /// `None` when the device was disabled, deleted or given other credentials after
    /// [`Hub::authenticate`] read its identity (or, rarely, another device sharing its close
    /// counter was): the connection must be refused, with an answer the device retries, since
    /// its credentials may still be good.
    pub fn connect_session(&self, d: &HubDevice) -> Option<SessionHandle> {
        let now = Timestamp::now().to_azure_string();
        let Some(handle) = self.sessions.register(&d.hub, &d.device_id, d.closes, now) else {
            tracing::info!(hub = %d.hub, device = %d.device_id, "device identity changed while it connected; refusing the connection");
            return None;
        };
        d.touch(Timestamp::now());
        fleetgate_metrics::METRICS.hub_sessions.set(self.sessions.count() as i64);
        Some(handle)
    }

    pub fn disconnect_session(&self, d: &HubDevice, id: u64) {
        self.sessions.unregister(&d.hub, &d.device_id, id, Timestamp::now().to_azure_string());
        fleetgate_metrics::METRICS.hub_sessions.set(self.sessions.count() as i64);
        // Calls sent on this connection can no longer be answered (an answer counts only on
        // the connection the call went out on): their callers learn it now, not at timeout.
        self.methods.forget_connection(id);
    }

    /// The subscriptions a CleanSession-0 device left behind (stream, granted QoS 0 or 1).
    /// Devices rely on them: the SDKs do not subscribe again after reconnecting.
    pub async fn load_subscriptions(&self, d: &HubDevice) -> Result<Option<Vec<(Subscription, u8)>>, AzureError> {
        let Some(state) = self.store.mqtt_session(&d.hub, &d.device_id).await.map_err(store_err)? else {
            return Ok(None);
        };
        let map: serde_json::Map<String, Value> = serde_json::from_str(&state).unwrap_or_default();
        Ok(Some(
            map.iter()
                .filter_map(|(k, v)| Some((Subscription::from_name(k)?, v.as_u64().unwrap_or(1).min(1) as u8)))
                .collect(),
        ))
    }

    /// Persists (Some) or forgets (None) a device's subscriptions.
    pub async fn save_subscriptions(
        &self,
        d: &HubDevice,
        subs: Option<&[(Subscription, u8)]>,
    ) -> Result<(), AzureError> {
        let state =
            subs.map(|s| Value::Object(s.iter().map(|(k, q)| (k.name().to_owned(), json!(q))).collect()).to_string());
        self.store.set_mqtt_session(&d.hub, &d.device_id, state.as_deref()).await.map_err(store_err)
    }

    /// Ends the device's live connection on `hub`, if any: its identity was changed outside the
    /// hub's service API (DPS re-provisioning gave it other credentials or moved it away).
    pub fn close_session(&self, hub: &str, device_id: &str) {
        self.sessions.close(hub, device_id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fleetgate_core::keys::SymmetricKey;
    use fleetgate_store::LinkedHub;

    use super::*;
    use crate::authentication::Authentication;
    use crate::registry::DeviceSpec;
    use crate::HubConfig;
    use fleetgate_core::device::DeviceStatus;

    /// Issue 12 item 4: a change committed while a CONNECT is between [`Hub::authenticate`] and
    /// [`Hub::connect_session`] finds no session to close; the session must then be refused.
    #[tokio::test]
    async fn a_change_committed_while_a_device_connects_refuses_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(fleetgate_store::SqliteStore::open(&dir.path().join("fleetgate.db")).unwrap());
        let hub = Hub::new(store.clone(), HubConfig::default());
        let host = "hub.example.net";
        fleetgate_store::InstanceStore::add_hub(&*store, &LinkedHub::new(host, SymmetricKey::generate().to_base64()))
            .await
            .unwrap();
        let key = SymmetricKey::generate();
        let device = |key: &SymmetricKey, status: &str| DeviceSpec {
            status: if status == "enabled" { DeviceStatus::Enabled } else { DeviceStatus::Disabled },
            status_reason: None,
            keys: [Some(key.clone()), Some(key.clone())],
            credentials: None,
        };
        hub.put_device(host, "dev", device(&key, "enabled"), None).await.unwrap();
        let token = || {
            let expiry = Timestamp::now().unix_seconds() + 600;
            fleetgate_core::sas::build_token(&key, &format!("{host}/devices/dev"), expiry, None)
        };
        let authenticate = || async {
            match hub.authenticate(host, "dev", Some(&token()), None, None).await {
                Authentication::Identified(d) => d,
                other => panic!("not identified: {other:?}"),
            }
        };
        for (what, change) in [
            ("credentials changed", device(&SymmetricKey::generate(), "enabled")),
            ("disabled", device(&key, "disabled")),
        ] {
            let connecting = authenticate().await;
            hub.put_device(host, "dev", change, Some("*".into())).await.unwrap();
            assert!(hub.connect_session(&connecting).is_none(), "{what}: session refused");
            assert!(hub.sessions.get(host, "dev").is_none(), "{what}");
            hub.put_device(host, "dev", device(&key, "enabled"), Some("*".into())).await.unwrap();
        }
        // DPS re-provisioning reports its changes through `close_session`.
        let connecting = authenticate().await;
        hub.close_session(host, "dev");
        assert!(hub.connect_session(&connecting).is_none(), "re-provisioned: session refused");
        // Deleted.
        let connecting = authenticate().await;
        hub.delete_device(host, "dev", None).await.unwrap();
        assert!(hub.connect_session(&connecting).is_none(), "deleted: session refused");
        // Nothing changed: the session is registered.
        hub.put_device(host, "dev", device(&key, "enabled"), None).await.unwrap();
        let connecting = authenticate().await;
        let handle = hub.connect_session(&connecting).expect("registered");
        assert_eq!(hub.sessions.get(host, "dev").map(|l| l.id), Some(handle.id));
    }
}
