//! [`AuditSink`] on SQLite: the audit trail in `telemetry.db`.

use async_trait::async_trait;
use fleetgate_core::audit::{AuditEntry, AuditQuery};
use rusqlite::params;

use super::{backend, parse, SqliteStore};
use crate::{AuditSink, StoreResult};

#[async_trait]
impl AuditSink for SqliteStore {
    async fn append_audit(&self, entries: Vec<AuditEntry>) -> StoreResult<()> {
        self.with_audit_db(move |c| {
            let tx = c.transaction().map_err(backend)?;
            {
                let mut st = tx.prepare_cached("INSERT INTO audit (time, body) VALUES (?1, ?2)").map_err(backend)?;
                for e in &entries {
                    st.execute(params![e.time, serde_json::to_string(e).map_err(backend)?]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
    }
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let q = query.clone();
        self.with_audit_db(move |c| {
            let since = q.since.map(|t| t.to_azure_string()).unwrap_or_default();
            // Newest first, so that a limit keeps the latest entries (what someone looking into
            // a problem wants); reversed below to read in the order they happened.
            let mut st =
                c.prepare_cached("SELECT seq, body FROM audit WHERE time >= ?1 ORDER BY seq DESC").map_err(backend)?;
            let rows = st.query_map([since], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))).map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, body) = row.map_err(backend)?;
                let mut e: AuditEntry = parse(&body)?;
                e.seq = seq as u64;
                if q.matches(&e) {
                    out.push(e);
                    if q.limit > 0 && out.len() >= q.limit {
                        break;
                    }
                }
            }
            out.reverse();
            Ok(out)
        })
        .await
    }
    async fn prune_audit(&self, before: &str, max_rows: u64) -> StoreResult<u64> {
        // In chunks, each its own transaction and its own turn on the connection: a large first
        // prune never holds the file (or the audit writer) for long.
        const CHUNK: i64 = 10_000;
        let chunk = |sql: &'static str, bound: rusqlite::types::Value| {
            self.with_audit_db(move |c| c.execute(sql, params![bound, CHUNK]).map_err(backend))
        };
        let mut deleted = 0u64;
        let by_time = "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE time < ?1 LIMIT ?2)";
        loop {
            let n = chunk(by_time, before.to_owned().into()).await?;
            deleted += n as u64;
            if (n as i64) < CHUNK {
                break;
            }
        }
        // Sequence numbers only grow, so the newest `max_rows` are those above this floor.
        let newest: Option<i64> = self
            .with_audit_db(|c| c.query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0)).map_err(backend))
            .await?;
        if let Some(newest) = newest {
            let floor = newest.saturating_sub(i64::try_from(max_rows).unwrap_or(i64::MAX));
            let by_seq = "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE seq <= ?1 ORDER BY seq LIMIT ?2)";
            loop {
                let n = chunk(by_seq, floor.into()).await?;
                deleted += n as u64;
                if (n as i64) < CHUNK {
                    break;
                }
            }
        }
        Ok(deleted)
    }
}
