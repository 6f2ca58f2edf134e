//! The SQLite side of the cloud-to-device queues and of the feedback they produce: plain
//! functions on a connection, run by [`crate::SqliteStore`] on its writer (each call is one
//! savepoint, so a message leaves its queue and its feedback record is written together or not
//! at all). Which outcome makes a record is [`fleetgate_core::feedback::record`]'s decision.

use fleetgate_core::feedback::{self, FeedbackRecord, Outcome};
use fleetgate_core::message::C2dMessage;
use fleetgate_core::time::Timestamp;
use rusqlite::{params, Connection};

use crate::{C2dSettlement, FeedbackBatch, Lock, StoreError, StoreResult};

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS c2d_feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, hub_key TEXT NOT NULL, created INTEGER NOT NULL,
    lock_token TEXT, locked_until INTEGER NOT NULL DEFAULT 0, deliveries INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS c2d_feedback_by_hub ON c2d_feedback (hub_key, seq);
"#;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn parse(body: &str) -> StoreResult<C2dMessage> {
    serde_json::from_str(body).map_err(backend)
}

/// The device's queue, oldest first, with each row's sequence number.
fn queue(c: &Connection, h: &str, d: &str) -> StoreResult<Vec<(i64, C2dMessage)>> {
    let mut st = c
        .prepare_cached("SELECT seq, body FROM c2d WHERE hub_key = ?1 AND device_key = ?2 ORDER BY seq")
        .map_err(backend)?;
    let rows = st.query_map(params![h, d], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))).map_err(backend)?;
    rows.map(|r| {
        let (seq, body) = r.map_err(backend)?;
        Ok((seq, parse(&body)?))
    })
    .collect()
}

/// Removes row `seq` and writes the feedback its message's ack asks for.
fn remove(c: &Connection, seq: i64, m: &C2dMessage, outcome: Outcome, now: i64) -> StoreResult<()> {
    c.execute("DELETE FROM c2d WHERE seq = ?1", params![seq]).map_err(backend)?;
    if let Some(r) = feedback::record(m, outcome, &Timestamp::from_unix_seconds(now).to_azure_string()) {
        let body = serde_json::to_string(&r).map_err(backend)?;
        c.execute(
            "INSERT INTO c2d_feedback (hub_key, created, body) VALUES (?1, ?2, ?3)",
            params![m.hub.to_ascii_lowercase(), now, body],
        )
        .map_err(backend)?;
    }
    Ok(())
}

fn update(c: &Connection, seq: i64, m: &C2dMessage) -> StoreResult<()> {
    let body = serde_json::to_string(m).map_err(backend)?;
    c.execute("UPDATE c2d SET body = ?2 WHERE seq = ?1", params![seq, body]).map_err(backend)?;
    Ok(())
}

/// Removes the device's expired messages (with their feedback); returns the rest.
fn live(c: &Connection, h: &str, d: &str, now: i64) -> StoreResult<Vec<(i64, C2dMessage)>> {
    let mut out = Vec::new();
    for (seq, m) in queue(c, h, d)? {
        if m.expiry < now {
            remove(c, seq, &m, Outcome::Expired, now)?;
        } else {
            out.push((seq, m));
        }
    }
    Ok(out)
}

/// Messages to hand to a connected (MQTT) device: unexpired and not locked by an HTTPS receive.
pub(crate) fn pending(c: &Connection, h: &str, d: &str, now: i64) -> StoreResult<Vec<C2dMessage>> {
    Ok(live(c, h, d, now)?.into_iter().filter(|(_, m)| m.locked_until <= now).map(|(_, m)| m).collect())
}

/// The MQTT acknowledgement of message `id`: completed.
pub(crate) fn complete(c: &Connection, h: &str, d: &str, id: &str, now: i64) -> StoreResult<bool> {
    let found = queue(c, h, d)?.into_iter().find(|(_, m)| m.id == id);
    match found {
        Some((seq, m)) => remove(c, seq, &m, Outcome::Success, now).map(|()| true),
        None => Ok(false),
    }
}

pub(crate) fn purge(c: &Connection, h: &str, d: &str, now: i64) -> StoreResult<u64> {
    let q = queue(c, h, d)?;
    for (seq, m) in &q {
        remove(c, *seq, m, Outcome::Purged, now)?;
    }
    Ok(q.len() as u64)
}

/// The oldest message not locked now, locked under `lock` (its token fresh, from the caller),
/// its delivery counted. One already delivered `lock.max_deliveries` times is dead-lettered
/// instead.
pub(crate) fn receive(c: &Connection, h: &str, d: &str, lock: &Lock) -> StoreResult<Option<C2dMessage>> {
    let (now, max_deliveries) = (lock.now, lock.max_deliveries);
    for (seq, mut m) in live(c, h, d, now)? {
        if m.locked_until > now {
            continue;
        }
        if m.delivery_count >= max_deliveries {
            remove(c, seq, &m, Outcome::DeliveryCountExceeded, now)?;
            continue;
        }
        m.delivery_count += 1;
        m.lock_token = Some(lock.token.clone());
        m.locked_until = lock.until;
        update(c, seq, &m)?;
        return Ok(Some(m));
    }
    Ok(None)
}

/// Settles the message locked under `token`. `Ok(false)`: no message holds that lock now.
pub(crate) fn settle(c: &Connection, h: &str, d: &str, token: &str, how: C2dSettlement, now: i64) -> StoreResult<bool> {
    let found = live(c, h, d, now)?
        .into_iter()
        .find(|(_, m)| m.locked_until > now && m.lock_token.as_deref().is_some_and(|t| t == token));
    let Some((seq, mut m)) = found else { return Ok(false) };
    match how {
        C2dSettlement::Complete => remove(c, seq, &m, Outcome::Success, now)?,
        C2dSettlement::Reject => remove(c, seq, &m, Outcome::Rejected, now)?,
        C2dSettlement::Abandon => {
            m.lock_token = None;
            m.locked_until = 0;
            update(c, seq, &m)?;
        }
    }
    Ok(true)
}

/// Expires the hub's queued messages whose time passed, so that their feedback is made even
/// for a device that never comes back.
fn expire_hub(c: &Connection, h: &str, now: i64) -> StoreResult<()> {
    let mut st =
        c.prepare_cached("SELECT DISTINCT device_key FROM c2d WHERE hub_key = ?1 AND expiry < ?2").map_err(backend)?;
    let devices: Vec<String> =
        st.query_map(params![h, now], |r| r.get(0)).map_err(backend)?.collect::<Result<_, _>>().map_err(backend)?;
    for d in devices {
        live(c, h, &d, now)?;
    }
    Ok(())
}

/// Up to `max` unlocked feedback records of the hub, oldest first, locked together under
/// `lock` (its token fresh, from the caller). Records older than `created_after` or already
/// delivered `lock.max_deliveries` times are dropped first (Azure's feedback TTL and delivery
/// count).
pub(crate) fn receive_feedback(
    c: &Connection,
    h: &str,
    lock: &Lock,
    created_after: i64,
    max: usize,
) -> StoreResult<Option<FeedbackBatch>> {
    let (now, max_deliveries) = (lock.now, lock.max_deliveries);
    expire_hub(c, h, now)?;
    c.execute(
        "DELETE FROM c2d_feedback WHERE hub_key = ?1 AND (created < ?2 OR (deliveries >= ?3 AND locked_until <= ?4))",
        params![h, created_after, max_deliveries, now],
    )
    .map_err(backend)?;
    let mut st = c
        .prepare_cached(
            "SELECT seq, body FROM c2d_feedback WHERE hub_key = ?1 AND locked_until <= ?2 ORDER BY seq LIMIT ?3",
        )
        .map_err(backend)?;
    let rows: Vec<(i64, String)> = st
        .query_map(params![h, now, max as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut records = Vec::with_capacity(rows.len());
    for (seq, body) in rows {
        c.execute(
            "UPDATE c2d_feedback SET lock_token = ?2, locked_until = ?3, deliveries = deliveries + 1 WHERE seq = ?1",
            params![seq, lock.token, lock.until],
        )
        .map_err(backend)?;
        records.push(serde_json::from_str::<FeedbackRecord>(&body).map_err(backend)?);
    }
    Ok(Some(FeedbackBatch { lock_token: lock.token.clone(), records }))
}

/// Completes (deletes) or abandons (unlocks) the feedback batch locked under `token`.
/// `Ok(false)`: no batch holds that lock now.
pub(crate) fn settle_feedback(c: &Connection, h: &str, token: &str, complete: bool, now: i64) -> StoreResult<bool> {
    let sql = if complete {
        "DELETE FROM c2d_feedback WHERE hub_key = ?1 AND lock_token = ?2 AND locked_until > ?3"
    } else {
        "UPDATE c2d_feedback SET lock_token = NULL, locked_until = 0
         WHERE hub_key = ?1 AND lock_token = ?2 AND locked_until > ?3"
    };
    c.execute(sql, params![h, token, now]).map(|n| n > 0).map_err(backend)
}
