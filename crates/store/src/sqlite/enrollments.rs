//! [`EnrollmentStore`] on SQLite: individual enrollments and groups as JSON documents.

use async_trait::async_trait;
use fleetgate_core::enrollment::{EnrollmentGroup, IndividualEnrollment};
use fleetgate_core::etag::check_if_match;
use fleetgate_core::AzureError;
use rusqlite::{params, Connection, OptionalExtension};

use super::{backend, key, parse, SqliteStore};
use crate::{EnrollmentStore, EnrollmentUpdate, GroupUpdate, StoreResult};

/// Read-modify-write of one document: the stored one (if any) in, the one to store out.
type DocumentUpdate<T> = Box<dyn FnOnce(Option<&T>) -> Result<T, AzureError> + Send>;

/// A table of JSON documents under a case-folded id, kept in insertion order: enrollment groups
/// and individual enrollments are stored the same way.
#[derive(Clone, Copy)]
struct Documents {
    table: &'static str,
    key: &'static str,
}

const GROUPS: Documents = Documents { table: "enrollment_groups", key: "id_key" };
const ENROLLMENTS: Documents = Documents { table: "enrollments", key: "reg_key" };

impl Documents {
    fn get<T: serde::de::DeserializeOwned>(self, c: &Connection, id: &str) -> StoreResult<Option<T>> {
        let sql = format!("SELECT body FROM {} WHERE {} = ?1", self.table, self.key);
        let body: Option<String> =
            c.prepare_cached(&sql).map_err(backend)?.query_row([id], |r| r.get(0)).optional().map_err(backend)?;
        body.map(|b| parse(&b)).transpose()
    }

    fn page<T: serde::de::DeserializeOwned>(self, c: &Connection, offset: usize, limit: usize) -> StoreResult<Vec<T>> {
        let sql = format!("SELECT body FROM {} ORDER BY seq LIMIT ?1 OFFSET ?2", self.table);
        let mut st = c.prepare(&sql).map_err(backend)?;
        let bodies = st.query_map(params![limit as i64, offset as i64], |r| r.get::<_, String>(0)).map_err(backend)?;
        bodies.map(|b| parse(&b.map_err(backend)?)).collect()
    }

    /// Read-modify-write, inside the caller's transaction; a refused update writes nothing.
    fn upsert<T: serde::Serialize + serde::de::DeserializeOwned>(
        self,
        tx: &Connection,
        id: &str,
        update: DocumentUpdate<T>,
    ) -> StoreResult<T> {
        let current: Option<T> = self.get(tx, id)?;
        let next = update(current.as_ref())?;
        let sql = format!(
            "INSERT INTO {} ({}, body) VALUES (?1, ?2) ON CONFLICT({}) DO UPDATE SET body = ?2",
            self.table, self.key, self.key
        );
        tx.execute(&sql, params![id, serde_json::to_string(&next).map_err(backend)?]).map_err(backend)?;
        Ok(next)
    }

    /// Deletes the document if `check` (an etag precondition) accepts it; `Ok(false)` if absent.
    fn delete<T: serde::de::DeserializeOwned>(
        self,
        tx: &Connection,
        id: &str,
        check: impl FnOnce(&T) -> Result<(), AzureError>,
    ) -> StoreResult<bool> {
        let Some(current) = self.get::<T>(tx, id)? else { return Ok(false) };
        check(&current)?;
        tx.execute(&format!("DELETE FROM {} WHERE {} = ?1", self.table, self.key), [id]).map_err(backend)?;
        Ok(true)
    }
}

#[async_trait]
impl EnrollmentStore for SqliteStore {
    async fn enrollment(&self, registration_id: &str) -> StoreResult<Option<IndividualEnrollment>> {
        let id = key(registration_id);
        self.with(move |c| ENROLLMENTS.get(c, &id)).await
    }
    async fn enrollment_ids(&self) -> StoreResult<Vec<String>> {
        self.with(|c| {
            let mut st = c.prepare_cached("SELECT reg_key FROM enrollments").map_err(backend)?;
            let ids = st.query_map([], |r| r.get::<_, String>(0)).map_err(backend)?;
            ids.map(|r| r.map_err(backend)).collect()
        })
        .await
    }
    async fn enrollments(&self, offset: usize, limit: usize) -> StoreResult<Vec<IndividualEnrollment>> {
        self.with(move |c| ENROLLMENTS.page(c, offset, limit)).await
    }
    async fn upsert_enrollment(
        &self,
        registration_id: &str,
        update: EnrollmentUpdate,
    ) -> StoreResult<IndividualEnrollment> {
        let id = key(registration_id);
        self.write(move |c| ENROLLMENTS.upsert(c, &id, update)).await
    }
    async fn delete_enrollment(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        let (id, if_match) = (key(registration_id), if_match.map(str::to_owned));
        self.write(move |c| {
            ENROLLMENTS.delete(c, &id, |e: &IndividualEnrollment| {
                check_if_match(if_match.as_deref(), e.settings.etag.as_deref())
            })
        })
        .await
    }
    async fn group(&self, id: &str) -> StoreResult<Option<EnrollmentGroup>> {
        let id = key(id);
        self.with(move |c| GROUPS.get(c, &id)).await
    }
    async fn groups(&self) -> StoreResult<Vec<EnrollmentGroup>> {
        self.with(|c| GROUPS.page(c, 0, usize::MAX >> 1)).await
    }
    async fn upsert_group(&self, id: &str, update: GroupUpdate) -> StoreResult<EnrollmentGroup> {
        let id = key(id);
        self.write(move |c| GROUPS.upsert(c, &id, update)).await
    }
    async fn delete_group(&self, id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        let (id, if_match) = (key(id), if_match.map(str::to_owned));
        self.write(move |c| {
            GROUPS.delete(c, &id, |g: &EnrollmentGroup| check_if_match(if_match.as_deref(), g.settings.etag.as_deref()))
        })
        .await
    }
}
