//! [`DeviceQueue`] on SQLite: the cloud-to-device queue and feedback (the SQL is in
//! `crate::c2d_queue`) and persistent MQTT sessions.

use async_trait::async_trait;
use fleetgate_core::message::C2dMessage;
use fleetgate_core::AzureError;
use rusqlite::{params, OptionalExtension};

use super::{backend, key, SqliteStore};
use crate::{DeviceQueue, StoreError, StoreResult};

#[async_trait]
impl DeviceQueue for SqliteStore {
    async fn enqueue_c2d(&self, message: &C2dMessage, max_depth: usize) -> StoreResult<()> {
        let m = message.clone();
        self.write(move |c| {
            let tx = c;
            let (h, d) = (key(&m.hub), m.device_id.clone());
            let depth: i64 = tx
                .query_row("SELECT COUNT(*) FROM c2d WHERE hub_key = ?1 AND device_key = ?2", params![h, d], |r| {
                    r.get(0)
                })
                .map_err(backend)?;
            if depth as usize >= max_depth {
                return Err(StoreError::Rejected(AzureError::new(
                    fleetgate_core::ErrorCode::QueueDepthExceeded,
                    format!("The device's cloud-to-device queue is full ({max_depth} messages)."),
                )));
            }
            let body = serde_json::to_string(&m).map_err(backend)?;
            tx.execute(
                "INSERT INTO c2d (hub_key, device_key, id, expiry, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![h, d, m.id, m.expiry, body],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }
    async fn pending_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<Vec<C2dMessage>> {
        let (h, d) = (key(hub), device_id.to_owned());
        self.write(move |c| crate::c2d_queue::pending(c, &h, &d, now)).await
    }
    async fn c2d_count(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64> {
        let (h, d) = (key(hub), device_id.to_owned());
        self.with(move |c| {
            c.query_row(
                "SELECT COUNT(*) FROM c2d WHERE hub_key = ?1 AND device_key = ?2 AND expiry >= ?3",
                params![h, d, now],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }
    async fn complete_c2d(&self, hub: &str, device_id: &str, id: &str) -> StoreResult<bool> {
        let (h, d, id) = (key(hub), device_id.to_owned(), id.to_owned());
        let now = fleetgate_core::time::Timestamp::now().unix_seconds();
        self.write(move |c| crate::c2d_queue::complete(c, &h, &d, &id, now)).await
    }
    async fn purge_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64> {
        let (h, d) = (key(hub), device_id.to_owned());
        self.write(move |c| crate::c2d_queue::purge(c, &h, &d, now)).await
    }
    async fn receive_c2d(&self, hub: &str, device_id: &str, lock: &crate::Lock) -> StoreResult<Option<C2dMessage>> {
        let (h, d, lock) = (key(hub), device_id.to_owned(), lock.clone());
        self.write(move |c| crate::c2d_queue::receive(c, &h, &d, &lock)).await
    }
    async fn settle_c2d(
        &self,
        hub: &str,
        device_id: &str,
        token: &str,
        how: crate::C2dSettlement,
        now: i64,
    ) -> StoreResult<bool> {
        let (h, d, t) = (key(hub), device_id.to_owned(), token.to_owned());
        self.write(move |c| crate::c2d_queue::settle(c, &h, &d, &t, how, now)).await
    }
    async fn receive_feedback(
        &self,
        hub: &str,
        lock: &crate::Lock,
        created_after: i64,
        max: usize,
    ) -> StoreResult<Option<crate::FeedbackBatch>> {
        let (h, lock) = (key(hub), lock.clone());
        self.write(move |c| crate::c2d_queue::receive_feedback(c, &h, &lock, created_after, max)).await
    }
    async fn settle_feedback(&self, hub: &str, token: &str, complete: bool, now: i64) -> StoreResult<bool> {
        let (h, t) = (key(hub), token.to_owned());
        self.write(move |c| crate::c2d_queue::settle_feedback(c, &h, &t, complete, now)).await
    }
    async fn mqtt_session(&self, hub: &str, device_id: &str) -> StoreResult<Option<String>> {
        let (h, d) = (key(hub), device_id.to_owned());
        self.with(move |c| {
            c.prepare_cached("SELECT state FROM mqtt_sessions WHERE hub_key = ?1 AND device_key = ?2")
                .map_err(backend)?
                .query_row([h, d], |r| r.get(0))
                .optional()
                .map_err(backend)
        })
        .await
    }
    async fn set_mqtt_session(&self, hub: &str, device_id: &str, state: Option<&str>) -> StoreResult<()> {
        let (h, d, state) = (key(hub), device_id.to_owned(), state.map(str::to_owned));
        self.write(move |c| {
            match state {
                Some(s) => c.execute(
                    "INSERT INTO mqtt_sessions (hub_key, device_key, state) VALUES (?1, ?2, ?3)
                     ON CONFLICT(hub_key, device_key) DO UPDATE SET state = ?3",
                    params![h, d, s],
                ),
                None => c.execute("DELETE FROM mqtt_sessions WHERE hub_key = ?1 AND device_key = ?2", params![h, d]),
            }
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }
}
