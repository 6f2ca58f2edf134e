//! The embedded store: the registry in one SQLite file in WAL mode, the audit trail in
//! `telemetry.db` beside it, and telemetry in the event log (`events/`, see
//! [`crate::event_log`]).
//!
//! Registry changes go to one writer thread (group commit, see [`SqliteStore`]); reads use
//! read-only connections on the blocking pool, so the async runtime never waits on disk.
//! `synchronous=FULL` for the registry: a commit that returned is on disk, which is what lets
//! us acknowledge a device only after it.
//!
//! This file holds what every role shares (the connections, the writer thread, the disk
//! reserve); each role trait is implemented in a file of its own (`instance.rs`,
//! `enrollments.rs`, `registrations.rs`, `registry.rs`, `queue.rs`, `events.rs`, `audit.rs`,
//! `health.rs`), and the tables and migrations are in `schema.rs`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension};

use crate::event_log::{EventLog, EventLogOptions};
use crate::{StoreError, StoreResult};
use schema::{migrate, move_events_table, AUDIT_SCHEMA, SCHEMA};

mod audit;
mod enrollments;
mod events;
mod health;
mod instance;
mod queue;
mod registrations;
mod registry;
mod schema;

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

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(backend)
}
