//! The embedded store: the registry in one SQLite file in WAL mode, the audit trail in
//! `telemetry.db` beside it, and telemetry in the event log (`events/`, see
//! [`crate::event_log`]).
//!
//! Registry changes go to one writer thread (group commit, see [`SqliteStore`]); reads use
//! read-only connections on the blocking pool, so the async runtime never waits on disk.
//! `synchronous=FULL` for the registry: a commit that returned is on disk, which is what lets
//! us acknowledge a device only after it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fleetgate_core::audit::{AuditEntry, AuditQuery};
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::{EnrollmentGroup, IndividualEnrollment};
use fleetgate_core::etag::check_if_match;
use fleetgate_core::message::{C2dMessage, ReceivedEvent, TelemetryEvent};
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::Twin;
use fleetgate_core::AzureError;
use rusqlite::{params, Connection, OptionalExtension};

use crate::event_log::{EventLog, EventLogError, EventLogOptions};
use crate::{
    AssignedDevice, AuditSink, DeviceQueue, DeviceRegistry, DeviceUpdate, EnrollmentStore, EnrollmentUpdate, EventPage,
    EventStream, GroupUpdate, Health, HubAllocation, HubRemoval, InstanceStore, LinkedHub, RegistrationStore,
    StoreError, StoreResult,
};

const SCHEMA: &str = r#"
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
const AUDIT_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
"#;

/// The store: SQLite in WAL mode with one writer and several readers.
///
/// Every change goes to one writer thread, which takes all the changes waiting (up to
/// [`MAX_WRITE_BATCH`]), applies each in its own savepoint (a refused change is rolled back
/// alone) and commits them together: one fsync for the batch (group commit), and a caller learns
/// its result only after that commit, so nothing is acknowledged before it is on disk. Reads use a
/// small pool of read-only connections, which WAL lets proceed while the writer commits.
#[derive(Clone)]
pub struct SqliteStore {
    /// The registry file, for [`SqliteStore::checkpoint`] and the occasional integrity check,
    /// each on a connection of its own.
    path: Arc<PathBuf>,
    writer: std::sync::mpsc::Sender<WriteJob>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: Arc<std::sync::atomic::AtomicUsize>,
    /// `telemetry.db` (named for what it held first): the audit trail.
    audit_db: Arc<Mutex<Connection>>,
    /// The telemetry stream, opened on first use: tools that open the store beside a running
    /// server (`fleetgate linked-hub`, `fleetgate audit`) never touch it.
    event_log: Arc<LazyEventLog>,
}

/// Free space the registry keeps for itself below the telemetry reserve: registry writes are
/// refused only under this share of the reserve, so registrations and twin updates (small, and
/// worth more than telemetry) go on after telemetry is refused, and still stop before SQLite
/// would fail with a full disk in the middle of a checkpoint.
fn registry_reserve(event_reserve: u64) -> u64 {
    event_reserve / 2
}

struct LazyEventLog {
    dir: PathBuf,
    options: EventLogOptions,
    log: Mutex<Option<Arc<EventLog>>>,
}

/// What a change produced, whatever its type (the caller downcasts it back).
type Produced = Box<dyn std::any::Any + Send>;
/// A change, run by the writer thread inside its transaction.
type Change = Box<dyn FnOnce(&Connection) -> StoreResult<Produced> + Send>;

/// One change for the writer thread, and where to send its result.
struct WriteJob {
    run: Change,
    reply: tokio::sync::oneshot::Sender<StoreResult<Produced>>,
}

/// The most changes committed together.
const MAX_WRITE_BATCH: usize = 256;
/// When the writer is busy (its last batch held more than one change), it waits this long after
/// a batch's first change for more before committing, like PostgreSQL's `commit_delay`: fewer,
/// larger commits. A commit's fsync costs about 0.15 ms of CPU on the machines measured (and
/// ~2 ms of waiting), so in a provisioning storm this halves the fsyncs for a millisecond of
/// latency; a lone change (an idle server) is committed at once.
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(1);
/// Read-only connections to the registry.
const READERS: usize = 4;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The stored key of a case-insensitive name: hub host names, registration, enrollment and
/// group ids (DPS ids are case-insensitive). Device ids are case-sensitive, as in IoT Hub, and are
/// stored as they are (see [`migrate`]).
fn key(s: &str) -> String {
    s.to_ascii_lowercase()
}

fn configure(c: &Connection) -> StoreResult<()> {
    c.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
    c.pragma_update(None, "synchronous", "FULL").map_err(backend)?;
    c.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
    Ok(())
}

impl SqliteStore {
    /// Opens `path` (the registry), `telemetry.db` beside it (the audit trail) and, on first
    /// use, the telemetry stream in `events/` beside it, with the default retention.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with(path, EventLogOptions::default())
    }

    /// [`SqliteStore::open`] with the telemetry stream's retention and segment size.
    ///
    /// Files are created owner-only (they hold keys), and SQLite gives each database's
    /// `-wal`/`-shm` the database's mode. Registry writes are refused (retryably) while the
    /// filesystem has less free space than half of `event_log.reserve_bytes`.
    pub fn open_with(path: &Path, event_log: EventLogOptions) -> StoreResult<Self> {
        crate::disk::ensure_private_file(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
        let audit_path = path.with_file_name("telemetry.db");
        crate::disk::ensure_private_file(&audit_path).map_err(|e| backend(format!("{}: {e}", audit_path.display())))?;
        let conn = Connection::open(path).map_err(backend)?;
        configure(&conn)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        conn.execute_batch(crate::c2d_queue::SCHEMA).map_err(backend)?;
        migrate(&conn)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let r = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(backend)?;
            r.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
            readers.push(Mutex::new(r));
        }
        let audit_db = Connection::open(&audit_path).map_err(backend)?;
        configure(&audit_db)?;
        // The audit trail is written after the work it records was answered, from a queue a
        // process crash loses anyway; an fsync per audit batch would buy little and cost the
        // storm a third of its fsyncs. NORMAL (in WAL mode) survives a process crash and stays
        // consistent; a power loss can lose its last moments.
        audit_db.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        audit_db.execute_batch(AUDIT_SCHEMA).map_err(backend)?;
        let (writer, jobs) = std::sync::mpsc::channel::<WriteJob>();
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
        let reserve = registry_reserve(event_log.reserve_bytes);
        std::thread::Builder::new()
            .name("fleetgate-store-writer".into())
            .spawn(move || write_loop(conn, jobs, dir, reserve))
            .map_err(backend)?;
        Ok(Self {
            path: Arc::new(path.to_owned()),
            writer,
            readers: Arc::new(readers),
            next_reader: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            audit_db: Arc::new(Mutex::new(audit_db)),
            event_log: Arc::new(LazyEventLog {
                dir: path.with_file_name("events"),
                options: event_log,
                log: Mutex::new(None),
            }),
        })
    }

    /// The ID scope stored in the registry at `path`, without creating or changing anything:
    /// `None` when the registry has no settings table or no ID scope (an emptied or replaced
    /// database). Fails when the file is missing or is not a database.
    pub fn stored_id_scope(path: &Path) -> StoreResult<Option<String>> {
        let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(backend)?;
        c.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
        let has_settings: bool = c
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'settings')",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if !has_settings {
            return Ok(None);
        }
        c.query_row("SELECT value FROM settings WHERE key = 'id_scope'", [], |r| r.get(0)).optional().map_err(backend)
    }

    /// Copies every committed change into the database files themselves and empties their WALs
    /// (the registry's and the audit trail's), so `fleetgate.db` and `telemetry.db` alone hold
    /// everything. A server calls it when it stops, after its last write: otherwise its data can
    /// sit in `fleetgate.db-wal` (SQLite copies the WAL back only as it grows, or when the last
    /// connection closes, which a process exit does not wait for), and a backup of the `.db`
    /// alone, or a deleted `-wal`, loses it. A write after this goes to the WAL again, as durable
    /// as any other. Fails when another connection kept a checkpoint from finishing within the
    /// busy timeout (a reader in the middle of a long read).
    pub async fn checkpoint(&self) -> StoreResult<()> {
        let (path, audit_db) = (self.path.clone(), self.audit_db.clone());
        tokio::task::spawn_blocking(move || {
            // Its own connection rather than the writer's: the writer only runs changes inside a
            // transaction, and a checkpoint must run outside one. FULL: the database file is
            // synced before the WAL is emptied.
            let registry = Connection::open_with_flags(&*path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
                .map_err(|e| backend(format!("{}: {e}", path.display())))?;
            configure(&registry)?;
            checkpoint_wal(&registry, &path)?;
            let audit = audit_db.lock().unwrap_or_else(|p| p.into_inner());
            checkpoint_wal(&audit, &path.with_file_name("telemetry.db"))
        })
        .await
        .map_err(backend)?
    }

    /// The telemetry stream; opened (and an older `events` table moved into it) on first use.
    fn event_log(&self) -> StoreResult<Arc<EventLog>> {
        let mut slot = self.event_log.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = slot.as_ref() {
            return Ok(log.clone());
        }
        let log = Arc::new(EventLog::open(&self.event_log.dir, self.event_log.options.clone()).map_err(backend)?);
        let telemetry_db = self.audit_db.lock().unwrap_or_else(|p| p.into_inner());
        move_events_table(&telemetry_db, &log)?;
        *slot = Some(log.clone());
        Ok(log)
    }

    /// Runs `f` with the telemetry stream on the blocking pool.
    async fn with_event_log<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EventLog) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&*this.event_log()?)).await.map_err(backend)?
    }

    /// Runs a read on one of the read-only connections, on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let i = self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.readers.len();
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            // A panic in another call poisons the mutex; the connection itself is still sound.
            let mut guard = readers[i].lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }

    /// Runs a change on the writer thread; resolves once its batch is committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let run = Box::new(move |c: &Connection| f(c).map(|v| Box::new(v) as Produced));
        self.writer.send(WriteJob { run, reply }).map_err(|_| backend("the store's writer has stopped"))?;
        let value = result.await.map_err(|_| backend("the store's writer dropped a change"))??;
        Ok(*value.downcast::<T>().expect("the writer returns what the job produced"))
    }

    /// Runs `f` on the audit trail's connection, on the blocking pool.
    async fn with_audit_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = self.audit_db.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }
}

/// `PRAGMA wal_checkpoint(TRUNCATE)` on `c` (the database at `path`): the WAL copied into the
/// database file and truncated to nothing, or an error when another connection kept it from
/// finishing (it waits for them up to the busy timeout).
fn checkpoint_wal(c: &Connection, path: &Path) -> StoreResult<()> {
    // One row: (1 when it could not finish, pages in the WAL, pages copied back).
    let (busy, pages, copied): (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(|e| backend(format!("{}: checkpoint: {e}", path.display())))?;
    if busy != 0 {
        return Err(backend(format!(
            "{}: checkpoint left unfinished by another connection ({copied} of {pages} WAL pages copied back)",
            path.display()
        )));
    }
    Ok(())
}

/// The writer thread: group commit with a savepoint per change.
/// `Some(why)` while the registry's filesystem is below `reserve` (0: never), logging when that
/// starts and ends.
fn below_reserve(dir: &Path, reserve: u64, low: &mut bool) -> Option<String> {
    if reserve == 0 {
        return None;
    }
    let free = match crate::disk::space(dir) {
        Ok(s) => s.free,
        // Not knowing is no reason to refuse: SQLite reports a full disk itself.
        Err(_) => return None,
    };
    let now_low = free < reserve;
    if now_low != *low {
        *low = now_low;
        if now_low {
            tracing::error!(dir = %dir.display(), free_bytes = free, reserve_bytes = reserve,
                "free disk space is below the registry's reserve: registrations and other changes are refused (retryably, 503) until space is freed");
        } else {
            tracing::info!(dir = %dir.display(), free_bytes = free, "free disk space is above the registry's reserve again");
        }
    }
    now_low.then(|| format!("{} has {free} bytes free, below the reserve of {reserve} bytes", dir.display()))
}

fn write_loop(mut conn: Connection, jobs: std::sync::mpsc::Receiver<WriteJob>, dir: PathBuf, reserve: u64) {
    let mut busy = false;
    let mut low = false;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        // Busy (the last batch had company): gather what arrives within COMMIT_DELAY too.
        let deadline = busy.then(|| std::time::Instant::now() + COMMIT_DELAY);
        while batch.len() < MAX_WRITE_BATCH {
            let next = match deadline.map(|d| d.saturating_duration_since(std::time::Instant::now())) {
                Some(left) if !left.is_zero() => jobs.recv_timeout(left).ok(),
                _ => jobs.try_recv().ok(),
            };
            match next {
                Some(j) => batch.push(j),
                None => break,
            }
        }
        busy = batch.len() > 1;
        if let Some(why) = below_reserve(&dir, reserve, &mut low) {
            for j in batch {
                fleetgate_metrics::METRICS.disk_reserve_refusal("registry");
                let _ = j.reply.send(Err(StoreError::Unavailable(why.clone())));
            }
            continue;
        }
        let mut tx = match conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                for j in batch {
                    let _ = j.reply.send(Err(backend(&e)));
                }
                continue;
            }
        };
        let mut done = Vec::with_capacity(batch.len());
        for job in batch {
            let result = match tx.savepoint() {
                Ok(mut sp) => {
                    let r = (job.run)(&sp);
                    let settled = if r.is_ok() { sp.commit() } else { sp.rollback() };
                    match settled {
                        Ok(()) => r,
                        Err(e) => Err(backend(e)),
                    }
                }
                Err(e) => Err(backend(e)),
            };
            done.push((job.reply, result));
        }
        let committed = tx.commit();
        for (reply, result) in done {
            let _ = reply.send(match (&committed, result) {
                (Ok(()), r) => r,
                (Err(e), Ok(_)) => Err(backend(e)),
                (Err(_), Err(e)) => Err(e),
            });
        }
    }
}

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

/// Brings a data directory from an earlier version up to the current schema.
/// The schema version this build writes (SQLite's `user_version`): 1 = device ids are stored
/// as they are (before, lower-cased: ids differing only in case were one device).
const SCHEMA_VERSION: i64 = 1;

fn migrate(c: &Connection) -> StoreResult<()> {
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
fn move_events_table(c: &Connection, log: &EventLog) -> StoreResult<()> {
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

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(backend)
}

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

fn read_hubs(c: &Connection) -> StoreResult<Vec<LinkedHub>> {
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
    async fn receive_c2d(
        &self,
        hub: &str,
        device_id: &str,
        now: i64,
        lock_until: i64,
        token: &str,
        max_deliveries: u32,
    ) -> StoreResult<Option<C2dMessage>> {
        let (h, d, t) = (key(hub), device_id.to_owned(), token.to_owned());
        self.write(move |c| crate::c2d_queue::receive(c, &h, &d, now, lock_until, &t, max_deliveries)).await
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
        now: i64,
        lock_until: i64,
        token: &str,
        created_after: i64,
        max_deliveries: u32,
        max: usize,
    ) -> StoreResult<Option<crate::FeedbackBatch>> {
        let (h, t) = (key(hub), token.to_owned());
        self.write(move |c| {
            crate::c2d_queue::receive_feedback(c, &h, now, lock_until, &t, created_after, max_deliveries, max)
        })
        .await
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

#[async_trait]
impl EventStream for SqliteStore {
    async fn append_events(&self, events: Vec<ReceivedEvent>) -> StoreResult<Vec<u64>> {
        self.with_event_log(move |log| {
            log.append(&events).map_err(|e| match e {
                EventLogError::NoSpace(why) => StoreError::Unavailable(why),
                e => backend(e),
            })
        })
        .await
    }
    async fn events(&self, hub: &str, from: u64, limit: usize) -> StoreResult<EventPage> {
        let hub = hub.to_owned();
        self.with_event_log(move |log| {
            let page = log.read(&hub, from, limit).map_err(backend)?;
            let events = page
                .events
                .into_iter()
                .map(|(seq, e)| TelemetryEvent::from_received(seq, &hub, e).map_err(backend))
                .collect::<StoreResult<_>>()?;
            Ok(EventPage { events, next: page.next })
        })
        .await
    }
    async fn last_event_seq(&self) -> StoreResult<u64> {
        self.with_event_log(|log| Ok(log.last_seq())).await
    }
}

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

fn read_device(c: &Connection, hub: &str, device: &str) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
    let row: Option<(String, String)> = c
        .prepare_cached("SELECT body, twin FROM devices WHERE hub_key = ?1 AND device_key = ?2")
        .map_err(backend)?
        .query_row([hub, device], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(backend)?;
    row.map(|(b, t)| Ok((parse(&b)?, parse(&t)?))).transpose()
}
