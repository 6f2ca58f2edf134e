//! Cloud-to-device messages: queued durably per device, delivered while it is connected (MQTT)
//! or when it asks (HTTPS receive with a lock), completed, rejected or abandoned by the device,
//! purged by the service; and the feedback records their `iothub-ack` asks for.

use std::time::Duration;

use fleetgate_core::feedback::AckMode;
use fleetgate_core::message::{C2dMessage, Properties};
use fleetgate_core::time::Timestamp;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::{C2dSettlement, FeedbackBatch};

use crate::authentication::HubDevice;
use crate::errors::store_err;
use crate::sessions::Outbound;
use crate::Hub;

/// Feedback records handed out together at most (one Azure feedback message is a batch).
const FEEDBACK_BATCH: usize = 100;

fn lock_lost() -> AzureError {
    AzureError::new(ErrorCode::DeviceMessageLockLost, "The lock token names no message locked now.")
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Hub {
    /// Queues a cloud-to-device message and wakes the device's session if it is connected.
    pub async fn send_c2d(
        &self,
        hub: &str,
        device_id: &str,
        mut properties: Properties,
        body: Vec<u8>,
        ttl: Option<Duration>,
        ack: AckMode,
    ) -> Result<String, AzureError> {
        if body.len() > self.config.max_c2d_bytes {
            return Err(AzureError::new(ErrorCode::MessageTooLarge, "Cloud-to-device messages may be at most 64 KB."));
        }
        let (dev, _) = self.twin(hub, device_id).await?;
        let ttl = ttl.unwrap_or(self.config.c2d_default_ttl).min(self.config.c2d_max_ttl);
        let id = uuid::Uuid::new_v4().to_string();
        properties.system.entry("message-id".into()).or_insert_with(|| id.clone());
        properties.system.insert("to".into(), format!("/devices/{}/messages/deviceBound", dev.device_id));
        if ack != AckMode::None {
            // The device sees what was asked, as in Azure (`iothub-ack` / `$.ack`).
            let value = serde_json::to_value(ack).ok().and_then(|v| v.as_str().map(str::to_owned));
            properties.system.insert("ack".into(), value.unwrap_or_default());
        }
        let now = Timestamp::now();
        let msg = C2dMessage {
            id: id.clone(),
            hub: dev.hub.clone(),
            device_id: dev.device_id.clone(),
            enqueued_time: now.to_azure_string(),
            expiry: now.unix_seconds() + secs(ttl),
            properties,
            body,
            ack,
            device_generation_id: dev.generation_id.clone(),
            ..Default::default()
        };
        self.store.enqueue_c2d(&msg, self.config.c2d_queue_depth).await.map_err(store_err)?;
        if let Some(live) = self.sessions.get(hub, device_id) {
            let _ = live.tx.try_send(Outbound::CloudToDevice);
        }
        Ok(id)
    }

    pub async fn pending_c2d(&self, d: &HubDevice) -> Result<Vec<C2dMessage>, AzureError> {
        self.store.pending_c2d(&d.hub, &d.device_id, Timestamp::now().unix_seconds()).await.map_err(store_err)
    }

    pub async fn complete_c2d(&self, d: &HubDevice, id: &str) -> Result<(), AzureError> {
        self.store.complete_c2d(&d.hub, &d.device_id, id).await.map_err(store_err).map(|_| ())
    }

    /// `DELETE /devices/{id}/commands`: empties the device's queue; how many were removed.
    pub async fn purge_c2d(&self, hub: &str, device_id: &str) -> Result<u64, AzureError> {
        let (dev, _) = self.twin(hub, device_id).await?;
        self.store.purge_c2d(&dev.hub, &dev.device_id, Timestamp::now().unix_seconds()).await.map_err(store_err)
    }

    /// The HTTPS receive: the oldest available message, locked to the caller for the lock
    /// timeout. `None`: nothing to receive now.
    pub async fn receive_c2d(&self, d: &HubDevice) -> Result<Option<C2dMessage>, AzureError> {
        let lock = new_lock(self.config.c2d_lock, self.config.c2d_max_delivery_count);
        self.store.receive_c2d(&d.hub, &d.device_id, &lock).await.map_err(store_err)
    }

    /// Completes, rejects or abandons the message the device holds under `lock_token`;
    /// 412 (lock lost) when it holds none under it.
    pub async fn settle_c2d(&self, d: &HubDevice, lock_token: &str, how: C2dSettlement) -> Result<(), AzureError> {
        let now = Timestamp::now().unix_seconds();
        match self.store.settle_c2d(&d.hub, &d.device_id, lock_token, how, now).await.map_err(store_err)? {
            true => Ok(()),
            false => Err(lock_lost()),
        }
    }

    /// `GET /messages/serviceBound/feedback`: a batch of feedback records, locked.
    pub async fn receive_feedback(&self, hub: &str) -> Result<Option<FeedbackBatch>, AzureError> {
        let lock = new_lock(self.config.feedback_lock, self.config.feedback_max_delivery_count);
        let created_after = lock.now.saturating_sub(secs(self.config.feedback_ttl));
        self.store.receive_feedback(hub, &lock, created_after, FEEDBACK_BATCH).await.map_err(store_err)
    }

    /// Completes (`complete`) or abandons the feedback batch locked under `lock_token`.
    pub async fn settle_feedback(&self, hub: &str, lock_token: &str, complete: bool) -> Result<(), AzureError> {
        let now = Timestamp::now().unix_seconds();
        match self.store.settle_feedback(hub, lock_token, complete, now).await.map_err(store_err)? {
            true => Ok(()),
            false => Err(lock_lost()),
        }
    }
}

/// A lock taken now for `duration` under a fresh, unguessable token.
fn new_lock(duration: Duration, max_deliveries: u32) -> fleetgate_store::Lock {
    let now = Timestamp::now().unix_seconds();
    fleetgate_store::Lock {
        now,
        until: now.saturating_add(secs(duration)),
        token: uuid::Uuid::new_v4().to_string(),
        max_deliveries,
    }
}
