//! [`InstanceStore`] on SQLite: settings and linked hubs (policies are settings).

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{backend, key, SqliteStore};
use crate::{HubAllocation, HubRemoval, InstanceStore, LinkedHub, StoreResult};

pub(super) fn read_hubs(c: &Connection) -> StoreResult<Vec<LinkedHub>> {
    let mut st =
        c.prepare_cached("SELECT host_name, owner_key, allocation FROM hubs ORDER BY rowid").map_err(backend)?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
        .map_err(backend)?;
    rows.map(|row| {
        let (host_name, owner_key, allocation) = row.map_err(backend)?;
        Ok(LinkedHub { host_name, owner_key, allocation: serde_json::from_str(&allocation).unwrap_or_default() })
    })
    .collect()
}

#[async_trait]
impl InstanceStore for SqliteStore {
    async fn setting(&self, k: &str) -> StoreResult<Option<String>> {
        let k = k.to_owned();
        self.with(move |c| {
            c.prepare_cached("SELECT value FROM settings WHERE key = ?1")
                .map_err(backend)?
                .query_row([k], |r| r.get(0))
                .optional()
                .map_err(backend)
        })
        .await
    }
    async fn set_setting(&self, k: &str, v: &str) -> StoreResult<()> {
        let (k, v) = (k.to_owned(), v.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                [k, v],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }
    async fn hubs(&self) -> StoreResult<Vec<LinkedHub>> {
        self.with(|c| read_hubs(c)).await
    }
    async fn add_hub(&self, hub: &LinkedHub) -> StoreResult<()> {
        let hub = hub.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO hubs (host_key, host_name, owner_key, allocation) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(host_key) DO NOTHING",
                params![
                    key(&hub.host_name),
                    hub.host_name,
                    hub.owner_key,
                    serde_json::to_string(&hub.allocation).map_err(backend)?
                ],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }
    async fn set_hub_allocation(&self, host_name: &str, allocation: &HubAllocation) -> StoreResult<bool> {
        let (h, a) = (key(host_name), serde_json::to_string(allocation).map_err(backend)?);
        self.write(move |c| {
            c.execute("UPDATE hubs SET allocation = ?2 WHERE host_key = ?1", params![h, a])
                .map(|n| n > 0)
                .map_err(backend)
        })
        .await
    }
    async fn remove_hub(&self, host_name: &str) -> StoreResult<HubRemoval> {
        let h = key(host_name);
        self.write(move |c| {
            let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> StoreResult<u64> {
                c.query_row(sql, p, |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(backend)
            };
            if count("SELECT COUNT(*) FROM hubs WHERE host_key = ?1", &[&h])? == 0 {
                return Ok(HubRemoval::NoSuchHub);
            }
            if count("SELECT COUNT(*) FROM hubs", &[])? <= 1 {
                return Ok(HubRemoval::LastHub);
            }
            let devices = count("SELECT COUNT(*) FROM devices WHERE hub_key = ?1", &[&h])?;
            if devices > 0 {
                return Ok(HubRemoval::HasDevices(devices));
            }
            for sql in [
                "DELETE FROM hubs WHERE host_key = ?1",
                "DELETE FROM c2d WHERE hub_key = ?1",
                "DELETE FROM c2d_feedback WHERE hub_key = ?1",
                "DELETE FROM mqtt_sessions WHERE hub_key = ?1",
                "DELETE FROM settings WHERE key = 'policies.hub:' || ?1",
            ] {
                c.execute(sql, params![h]).map_err(backend)?;
            }
            Ok(HubRemoval::Removed)
        })
        .await
    }
}
