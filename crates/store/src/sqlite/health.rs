//! [`Health`] on SQLite: the write probe and `quick_check`.

use async_trait::async_trait;
use fleetgate_core::time::Timestamp;
use rusqlite::Connection;

use super::{backend, SqliteStore};
use crate::{Health, InstanceStore, StoreResult};

#[async_trait]
impl Health for SqliteStore {
    async fn write_probe(&self) -> StoreResult<()> {
        self.set_setting("health.write_probe", &Timestamp::now().to_azure_string()).await
    }
    async fn integrity_check(&self) -> StoreResult<()> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // A connection of its own: the check reads the whole file and must not hold a reader.
            let c = Connection::open_with_flags(&*path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(backend)?;
            c.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
            let mut st = c.prepare("PRAGMA quick_check(3)").map_err(backend)?;
            let found = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            match found.as_slice() {
                [ok] if ok == "ok" => Ok(()),
                problems => Err(backend(format!("the registry failed its integrity check: {}", problems.join("; ")))),
            }
        })
        .await
        .map_err(backend)?
    }
}
