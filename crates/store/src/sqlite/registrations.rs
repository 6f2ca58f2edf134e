//! [`RegistrationStore`] on SQLite: registration records, and the assignment that writes one
//! together with the device identity.

use async_trait::async_trait;
use fleetgate_core::etag::check_if_match;
use fleetgate_core::registration::RegistrationRecord;
use rusqlite::{params, Connection, OptionalExtension};

use super::instance::read_hubs;
use super::registry::read_device;
use super::{backend, key, parse, SqliteStore};
use crate::{AssignedDevice, LinkedHub, RegistrationStore, StoreError, StoreResult};

/// The columns a registration row is read from: body, group, operation id, internal.
const REGISTRATION_COLUMNS: &str = "body, group_key, operation_id, internal";

fn read_registration(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Option<String>, String, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn registration_from(
    (body, group, operation_id, internal): (String, Option<String>, String, String),
) -> StoreResult<RegistrationRecord> {
    let mut r: RegistrationRecord = parse(&body)?;
    r.enrollment_group_id = group;
    r.operation_id = operation_id;
    r.internal = serde_json::from_str(&internal).unwrap_or_default();
    Ok(r)
}

fn read_registration_of(c: &Connection, id: &str) -> StoreResult<Option<RegistrationRecord>> {
    let sql = format!("SELECT {REGISTRATION_COLUMNS} FROM registrations WHERE reg_key = ?1");
    let row =
        c.prepare_cached(&sql).map_err(backend)?.query_row([id], read_registration).optional().map_err(backend)?;
    row.map(registration_from).transpose()
}

fn write_registration(tx: &Connection, r: &RegistrationRecord) -> StoreResult<()> {
    let body = serde_json::to_string(r).map_err(backend)?;
    tx.prepare_cached(
        "INSERT INTO registrations (reg_key, group_key, operation_id, body, internal) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(reg_key) DO UPDATE SET group_key = ?2, operation_id = ?3, body = ?4, internal = ?5",
    )
    .map_err(backend)?
    .execute(params![
        key(&r.registration_id),
        r.enrollment_group_id.as_deref().map(key),
        r.operation_id,
        body,
        serde_json::to_string(&r.internal).map_err(backend)?
    ])
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl RegistrationStore for SqliteStore {
    async fn registration(&self, registration_id: &str) -> StoreResult<Option<RegistrationRecord>> {
        let id = key(registration_id);
        self.with(move |c| read_registration_of(c, &id)).await
    }
    async fn assignment_inputs(
        &self,
        registration_id: &str,
    ) -> StoreResult<(Option<RegistrationRecord>, Vec<LinkedHub>)> {
        // One trip to the blocking pool for both: they are read on every registration.
        let id = key(registration_id);
        self.with(move |c| Ok((read_registration_of(c, &id)?, read_hubs(c)?))).await
    }
    async fn registrations_of_group(
        &self,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> StoreResult<Vec<RegistrationRecord>> {
        let g = key(group_id);
        self.with(move |c| {
            let sql = format!(
                "SELECT {REGISTRATION_COLUMNS} FROM registrations WHERE group_key = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3"
            );
            let mut st = c.prepare(&sql).map_err(backend)?;
            let rows = st.query_map(params![g, limit as i64, offset as i64], read_registration).map_err(backend)?;
            rows.map(|row| registration_from(row.map_err(backend)?)).collect()
        })
        .await
    }
    async fn delete_registration(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        let (id, if_match) = (key(registration_id), if_match.map(str::to_owned));
        self.write(move |c| {
            let tx = c;
            let current: Option<String> = tx
                .query_row("SELECT body FROM registrations WHERE reg_key = ?1", [&id], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            let Some(current) = current else {
                return Ok(false);
            };
            let current: RegistrationRecord = parse(&current)?;
            check_if_match(if_match.as_deref(), Some(&current.etag))?;
            tx.execute("DELETE FROM registrations WHERE reg_key = ?1", [&id]).map_err(backend)?;
            Ok(true)
        })
        .await
    }
    async fn put_registration(&self, record: &RegistrationRecord) -> StoreResult<()> {
        let record = record.clone();
        self.write(move |c| {
            let tx = c;
            write_registration(tx, &record)?;
            Ok(())
        })
        .await
    }
    async fn commit_assignment(
        &self,
        record: &RegistrationRecord,
        hub: &str,
        device_id: &str,
        device: AssignedDevice,
        moved_from: Option<(&str, &str)>,
    ) -> StoreResult<()> {
        let record = record.clone();
        let (hub, id) = (key(hub), device_id.to_owned());
        let moved_from = moved_from.map(|(h, d)| (key(h), d.to_owned()));
        self.write(move |tx| {
            write_registration(tx, &record)?;
            if let Some((h, d)) = &moved_from {
                for table in ["devices", "c2d", "mqtt_sessions"] {
                    tx.prepare_cached(&format!("DELETE FROM {table} WHERE hub_key = ?1 AND device_key = ?2"))
                        .map_err(backend)?
                        .execute(params![h, d])
                        .map_err(backend)?;
                }
            }
            let (device, twin) = device(read_device(tx, &hub, &id)?).map_err(StoreError::Rejected)?;
            let body = serde_json::to_string(&device).map_err(backend)?;
            let twin = serde_json::to_string(&twin).map_err(backend)?;
            tx.prepare_cached(
                "INSERT INTO devices (hub_key, device_key, body, twin) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(hub_key, device_key) DO UPDATE SET body = ?3, twin = ?4",
            )
            .map_err(backend)?
            .execute(params![hub, id, body, twin])
            .map_err(backend)?;
            Ok(())
        })
        .await
    }
}
