//! The registry's and the audit database's tables, and the migrations that bring an older data
//! directory up to them (including moving telemetry out of SQLite into the event log).

use fleetgate_core::message::{ReceivedEvent, TelemetryEvent};
use fleetgate_core::time::Timestamp;
use rusqlite::Connection;

use super::{backend, parse};
use crate::event_log::EventLog;
use crate::{StoreError, StoreResult};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hubs (
    host_key TEXT PRIMARY KEY, host_name TEXT NOT NULL, owner_key TEXT NOT NULL,
    allocation TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS enrollments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, reg_key TEXT NOT NULL UNIQUE, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_groups (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id_key TEXT NOT NULL UNIQUE, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS registrations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, reg_key TEXT NOT NULL UNIQUE, group_key TEXT,
    operation_id TEXT NOT NULL, body TEXT NOT NULL, internal TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS registrations_by_group ON registrations (group_key, seq);
CREATE TABLE IF NOT EXISTS devices (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hub_key TEXT NOT NULL, device_key TEXT NOT NULL, body TEXT NOT NULL, twin TEXT NOT NULL,
    UNIQUE (hub_key, device_key)
);
CREATE TABLE IF NOT EXISTS c2d (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hub_key TEXT NOT NULL, device_key TEXT NOT NULL, id TEXT NOT NULL, expiry INTEGER NOT NULL,
    body TEXT NOT NULL, UNIQUE (hub_key, device_key, id)
);
CREATE INDEX IF NOT EXISTS c2d_by_device ON c2d (hub_key, device_key, seq);
CREATE TABLE IF NOT EXISTS mqtt_sessions (
    hub_key TEXT NOT NULL, device_key TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (hub_key, device_key)
);
"#;

/// The audit trail lives in its own file and connection, so its writes never wait behind
/// registry writes. (Telemetry was an `events` table here; it is now the event log, and an
/// existing table is moved into the log the first time the log is opened.)
pub(super) const AUDIT_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
"#;

/// The schema version this build writes (SQLite's `user_version`): 1 = device ids are stored
/// as they are (before, lower-cased: ids differing only in case were one device).
const SCHEMA_VERSION: i64 = 1;

/// Brings a data directory from an earlier version up to the current schema.
pub(super) fn migrate(c: &Connection) -> StoreResult<()> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "the registry was written by a newer Fleetgate (schema {version}, this one knows up to {SCHEMA_VERSION})"
        )));
    }
    if version < 1 {
        // Device keys become the ids as the devices were created (kept in each identity's
        // body), in one transaction: the C2D queue and MQTT sessions follow their device.
        c.execute_batch(
            "BEGIN IMMEDIATE;
             UPDATE c2d SET device_key = COALESCE((SELECT json_extract(d.body, '$.deviceId') FROM devices d
                 WHERE d.hub_key = c2d.hub_key AND d.device_key = c2d.device_key), device_key);
             UPDATE mqtt_sessions SET device_key = COALESCE((SELECT json_extract(d.body, '$.deviceId')
                 FROM devices d WHERE d.hub_key = mqtt_sessions.hub_key AND d.device_key = mqtt_sessions.device_key),
                 device_key);
             UPDATE devices SET device_key = json_extract(body, '$.deviceId')
                 WHERE json_extract(body, '$.deviceId') IS NOT NULL;
             PRAGMA user_version = 1;
             COMMIT;",
        )
        .map_err(backend)?;
    }
    add_column_if_missing(
        c,
        "hubs",
        "allocation",
        "ALTER TABLE hubs ADD COLUMN allocation TEXT NOT NULL DEFAULT '{}'",
    )?;
    add_column_if_missing(
        c,
        "registrations",
        "internal",
        "ALTER TABLE registrations ADD COLUMN internal TEXT NOT NULL DEFAULT '{}'",
    )
}

/// Runs `alter` (statements adding columns) unless `table` already has `column`.
fn add_column_if_missing(c: &Connection, table: &str, column: &str, alter: &str) -> StoreResult<()> {
    let present = c
        .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")
        .and_then(|mut st| st.exists([table, column]))
        .map_err(backend)?;
    if !present {
        c.execute_batch(alter).map_err(backend)?;
    }
    Ok(())
}

/// An events row: the event as received, or (rows from before that) as JSON.
enum StoredEvent {
    Received(ReceivedEvent),
    Json(String),
}

fn read_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<(u64, StoredEvent)> {
    let seq = r.get::<_, i64>(0)? as u64;
    let stored = match r.get::<_, Option<Vec<u8>>>(5)? {
        Some(body) => StoredEvent::Received(ReceivedEvent {
            hub: String::new(),
            device_id: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
            enqueued_time: fleetgate_core::time::Timestamp::from_ticks(r.get::<_, Option<i64>>(3)?.unwrap_or_default()),
            bag: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
            connection: None,
            body,
        }),
        None => StoredEvent::Json(r.get(1)?),
    };
    Ok((seq, stored))
}

/// Moves the telemetry of an earlier version (the `events` table of `telemetry.db`, in either
/// of its row formats) into the event log, keeping every position, then drops the table. Safe
/// to repeat after a crash part way: rows the log already has are skipped.
pub(super) fn move_events_table(c: &Connection, log: &EventLog) -> StoreResult<()> {
    let exists: bool = c
        .query_row("SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'events'", [], |r| r.get(0))
        .map_err(backend)?;
    if !exists {
        return Ok(());
    }
    // The first format had only `body` (the event as JSON).
    add_column_if_missing(
        c,
        "events",
        "data",
        "ALTER TABLE events ADD COLUMN device TEXT; ALTER TABLE events ADD COLUMN time INTEGER;
         ALTER TABLE events ADD COLUMN bag TEXT; ALTER TABLE events ADD COLUMN data BLOB;",
    )?;
    let mut after = log.last_seq();
    let mut moved = 0usize;
    loop {
        let mut st = c
            .prepare(
                "SELECT seq, body, device, time, bag, data, hub_key FROM events WHERE seq > ?1 ORDER BY seq LIMIT 1000",
            )
            .map_err(backend)?;
        let rows = st
            .query_map([after as i64], |r| Ok((read_event(r)?, r.get::<_, String>(6)?)))
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        let Some(((last, _), _)) = rows.last() else { break };
        after = *last;
        let batch = rows
            .into_iter()
            .map(|((seq, stored), hub)| {
                let mut event = match stored {
                    StoredEvent::Received(e) => e,
                    StoredEvent::Json(body) => {
                        let e: TelemetryEvent = parse(&body)?;
                        ReceivedEvent {
                            hub: String::new(),
                            device_id: e.device_id,
                            enqueued_time: Timestamp::parse_azure(&e.enqueued_time).unwrap_or_else(Timestamp::now),
                            bag: e.properties.to_bag(),
                            connection: e.connection,
                            body: e.body,
                        }
                    }
                };
                event.hub = hub;
                Ok((seq, event))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        moved += batch.len();
        log.import(&batch).map_err(backend)?;
    }
    c.execute_batch("DROP TABLE events").map_err(backend)?;
    if moved > 0 {
        tracing::info!(events = moved, "moved stored telemetry from telemetry.db into the event log");
    }
    Ok(())
}
