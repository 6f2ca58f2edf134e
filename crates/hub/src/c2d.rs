//! Cloud-to-device messages: queued durably per device, delivered while it is connected,
//! completed by its acknowledgement.

use std::time::Duration;

use fleetgate_core::message::{C2dMessage, Properties};
use fleetgate_core::time::Timestamp;
use fleetgate_core::{DpsError, ErrorCode};

use crate::authentication::HubDevice;
use crate::hub::store_err;
use crate::sessions::Outbound;
use crate::Hub;

impl Hub {
    /// Queues a cloud-to-device message and wakes the device's session if it is connected.
    pub async fn send_c2d(
        &self,
        hub: &str,
        device_id: &str,
        mut properties: Properties,
        body: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<String, DpsError> {
        if body.len() > self.config.max_c2d_bytes {
            return Err(DpsError::new(ErrorCode::MessageTooLarge, "Cloud-to-device messages may be at most 64 KB."));
        }
        let (dev, _) = self.twin(hub, device_id).await?;
        let ttl = ttl.unwrap_or(self.config.c2d_default_ttl).min(self.config.c2d_max_ttl);
        let id = uuid::Uuid::new_v4().to_string();
        properties.system.entry("message-id".into()).or_insert_with(|| id.clone());
        properties.system.insert("to".into(), format!("/devices/{}/messages/deviceBound", dev.device_id));
        let now = Timestamp::now();
        let msg = C2dMessage {
            id: id.clone(),
            hub: dev.hub.clone(),
            device_id: dev.device_id.clone(),
            enqueued_time: now.to_azure_string(),
            expiry: now.unix_seconds() + ttl.as_secs() as i64,
            properties,
            body,
        };
        self.store.enqueue_c2d(&msg, self.config.c2d_queue_depth).await.map_err(store_err)?;
        if let Some(live) = self.sessions.get(hub, device_id) {
            let _ = live.tx.try_send(Outbound::CloudToDevice);
        }
        Ok(id)
    }

    pub async fn pending_c2d(&self, d: &HubDevice) -> Result<Vec<C2dMessage>, DpsError> {
        self.store.pending_c2d(&d.hub, &d.device_id, Timestamp::now().unix_seconds()).await.map_err(store_err)
    }

    pub async fn complete_c2d(&self, d: &HubDevice, id: &str) -> Result<(), DpsError> {
        self.store.complete_c2d(&d.hub, &d.device_id, id).await.map_err(store_err).map(|_| ())
    }
}
