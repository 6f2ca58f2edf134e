//! [`DeviceRegistry`] on SQLite: device identities and their twins.

use async_trait::async_trait;
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::twin::Twin;
use rusqlite::{params, Connection, OptionalExtension};

use super::{backend, key, parse, SqliteStore};
use crate::{DeviceRegistry, DeviceUpdate, StoreResult};

#[async_trait]
impl DeviceRegistry for SqliteStore {
    async fn device(&self, hub: &str, device_id: &str) -> StoreResult<Option<DeviceIdentity>> {
        Ok(self.twin(hub, device_id).await?.map(|(d, _)| d))
    }
    async fn devices(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<DeviceIdentity>> {
        let h = key(hub);
        self.with(move |c| {
            let mut st = c
                .prepare("SELECT body FROM devices WHERE hub_key = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3")
                .map_err(backend)?;
            let bodies =
                st.query_map(params![h, limit as i64, offset as i64], |r| r.get::<_, String>(0)).map_err(backend)?;
            bodies.map(|b| parse(&b.map_err(backend)?)).collect()
        })
        .await
    }
    async fn twin(&self, hub: &str, device_id: &str) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
        let (h, d) = (key(hub), device_id.to_owned());
        self.with(move |c| read_device(c, &h, &d)).await
    }
    async fn twins(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<(DeviceIdentity, Twin)>> {
        let h = key(hub);
        self.with(move |c| {
            let mut st = c
                .prepare("SELECT body, twin FROM devices WHERE hub_key = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3")
                .map_err(backend)?;
            let rows = st
                .query_map(params![h, limit as i64, offset as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(backend)?;
            rows.map(|row| {
                let (b, t) = row.map_err(backend)?;
                Ok((parse(&b)?, parse(&t)?))
            })
            .collect()
        })
        .await
    }
    async fn device_counts(&self, hub: &str) -> StoreResult<crate::DeviceCounts> {
        let h = key(hub);
        self.with(move |c| {
            // Counted in SQLite over the (hub_key, device_key) index; the status is read from
            // the stored identity (`"status": "enabled" | "disabled"`).
            let (total, enabled): (i64, i64) = c
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(json_extract(body, '$.status') = 'enabled'), 0)
                     FROM devices WHERE hub_key = ?1",
                    [h],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(backend)?;
            Ok(crate::DeviceCounts {
                total: u64::try_from(total).unwrap_or(0),
                enabled: u64::try_from(enabled).unwrap_or(0),
            })
        })
        .await
    }
    async fn update_device(
        &self,
        hub: &str,
        device_id: &str,
        update: DeviceUpdate,
    ) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
        let (h, d) = (key(hub), device_id.to_owned());
        self.write(move |c| {
            let tx = c;
            let current = read_device(tx, &h, &d)?;
            let next = update(current)?;
            match &next {
                Some((dev, twin)) => {
                    let body = serde_json::to_string(dev).map_err(backend)?;
                    let twin = serde_json::to_string(twin).map_err(backend)?;
                    tx.execute(
                        "INSERT INTO devices (hub_key, device_key, body, twin) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(hub_key, device_key) DO UPDATE SET body = ?3, twin = ?4",
                        params![h, d, body, twin],
                    )
                    .map_err(backend)?;
                }
                None => {
                    tx.execute("DELETE FROM devices WHERE hub_key = ?1 AND device_key = ?2", params![h, d])
                        .map_err(backend)?;
                    tx.execute("DELETE FROM mqtt_sessions WHERE hub_key = ?1 AND device_key = ?2", params![h, d])
                        .map_err(backend)?;
                    tx.execute("DELETE FROM c2d WHERE hub_key = ?1 AND device_key = ?2", params![h, d])
                        .map_err(backend)?;
                }
            }
            Ok(next)
        })
        .await
    }
}

pub(super) fn read_device(c: &Connection, hub: &str, device: &str) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
    let row: Option<(String, String)> = c
        .prepare_cached("SELECT body, twin FROM devices WHERE hub_key = ?1 AND device_key = ?2")
        .map_err(backend)?
        .query_row([hub, device], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(backend)?;
    row.map(|(b, t)| Ok((parse(&b)?, parse(&t)?))).transpose()
}
