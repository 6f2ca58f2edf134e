//! The audit trail's bounds (retention, row cap, refusals counted per source) and the registry's
//! integrity check, on the embedded store.

use std::sync::Arc;
use std::time::Duration;

use fleetgate_core::audit::{AuditCategory, AuditEntry, AuditQuery, Outcome};
use fleetgate_core::refusals::RefusalLimits;
mod common;
use common::TempPath;
use fleetgate_store::{AuditLog, AuditOptions, AuditSink, Health, InstanceStore, SqliteStore, Store};

fn temp_dir() -> TempPath {
    TempPath::dir()
}

fn entry(actor: &str, time: &str) -> AuditEntry {
    let mut e = AuditEntry::new(AuditCategory::DeviceOperations, "attest", actor, Outcome::Failure);
    e.time = time.to_owned();
    e
}

async fn all(store: &dyn Store) -> Vec<AuditEntry> {
    store.audit(&AuditQuery::default()).await.unwrap()
}

/// Polls `f` until it holds; panics naming `what` if it does not within 10 s (a generous bound:
/// the outcome is asserted, not the timing).
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        // Backoff between polls.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached within 10 s");
}

#[tokio::test]
async fn pruning_applies_the_retention_then_the_row_cap_oldest_first() {
    let dir = temp_dir();
    let store = SqliteStore::open(&dir.join("fleetgate.db")).unwrap();
    let mut entries: Vec<_> = (0..10).map(|i| entry(&format!("old-{i}"), "2020-01-01T00:00:00.0000000Z")).collect();
    entries.extend((0..30).map(|i| entry(&format!("new-{i:02}"), &format!("2030-01-01T00:00:{i:02}.0000000Z"))));
    store.append_audit(entries).await.unwrap();

    let deleted = store.prune_audit("2025-01-01T00:00:00Z", 1_000).await.unwrap();
    assert_eq!(deleted, 10);
    assert_eq!(all(&store).await.len(), 30);

    let deleted = store.prune_audit("2025-01-01T00:00:00Z", 12).await.unwrap();
    assert_eq!(deleted, 18);
    let left: Vec<_> = all(&store).await.into_iter().map(|e| e.actor).collect();
    assert_eq!(left, (18..30).map(|i| format!("new-{i:02}")).collect::<Vec<_>>());
    assert_eq!(store.prune_audit("2025-01-01T00:00:00Z", 12).await.unwrap(), 0);
}

#[tokio::test]
async fn the_audit_log_prunes_periodically() {
    let dir = temp_dir();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("fleetgate.db")).unwrap());
    store
        .append_audit((0..50).map(|i| entry(&format!("d{i}"), "2030-01-01T00:00:00.0000000Z")).collect())
        .await
        .unwrap();
    store.append_audit(vec![entry("ancient", "2001-01-01T00:00:00.0000000Z")]).await.unwrap();
    let options = AuditOptions { max_rows: 20, prune_every: Duration::from_millis(50), ..AuditOptions::default() };
    let _log = AuditLog::start_with(store.clone(), options);
    eventually("pruned to 20 rows", async || all(store.as_ref()).await.len() == 20).await;
    assert!(all(store.as_ref()).await.iter().all(|e| e.actor != "ancient"));
}

#[tokio::test]
async fn refusals_from_one_source_are_one_entry_and_one_summary() {
    let dir = temp_dir();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("fleetgate.db")).unwrap());
    let refusals = RefusalLimits {
        window: Duration::from_millis(300),
        max_failures: 0,
        backoff: Duration::from_secs(1),
        recorded: 1,
        max_sources: 100,
    };
    let log = AuditLog::start_with(store.clone(), AuditOptions { refusals, ..AuditOptions::default() });
    let flooder = "192.0.2.1".parse().unwrap();
    for i in 0..5000 {
        log.refused(Some(flooder), entry(&format!("dev-{i}"), "2030-01-01T00:00:00.0000000Z"));
    }
    log.refused(Some("192.0.2.2".parse().unwrap()), entry("other", "2030-01-01T00:00:00.0000000Z"));
    // In-process callers (no address) are recorded one by one.
    log.refused(None, entry("cli-1", "2030-01-01T00:00:00.0000000Z"));
    log.refused(None, entry("cli-2", "2030-01-01T00:00:00.0000000Z"));

    eventually("the refusals summary", async || all(store.as_ref()).await.iter().any(|e| e.operation == "refusals"))
        .await;
    let trail = all(store.as_ref()).await;
    assert_eq!(trail.len(), 5, "{trail:#?}");
    let from_flooder: Vec<_> = trail.iter().filter(|e| e.source.as_deref() == Some("192.0.2.1")).collect();
    assert_eq!(from_flooder.len(), 2);
    assert_eq!(from_flooder[0].actor, "dev-0");
    assert_eq!(from_flooder[1].reason.as_deref(), Some("4999 more refusals from 192.0.2.1"));
    assert!(trail.iter().any(|e| e.actor == "other" && e.source.as_deref() == Some("192.0.2.2")));
    assert!(trail.iter().any(|e| e.actor == "cli-1") && trail.iter().any(|e| e.actor == "cli-2"));
}

#[tokio::test]
async fn a_source_with_too_many_refusals_is_turned_away_for_the_backoff() {
    let dir = temp_dir();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("fleetgate.db")).unwrap());
    let refusals = RefusalLimits { max_failures: 3, backoff: Duration::from_secs(30), ..RefusalLimits::default() };
    let log = AuditLog::start_with(store, AuditOptions { refusals, ..AuditOptions::default() });
    let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    for _ in 0..3 {
        assert!(log.admit(Some(a)).is_ok());
        log.refused(Some(a), entry("x", "2030-01-01T00:00:00.0000000Z"));
    }
    let wait = log.admit(Some(a)).unwrap_err();
    assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
    assert!(log.admit(Some(b)).is_ok());
    assert!(log.admit(None).is_ok());
}

#[tokio::test]
async fn a_registry_damaged_mid_file_fails_its_integrity_check() {
    let dir = temp_dir();
    let path = dir.join("fleetgate.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store.integrity_check().await.unwrap();
        for i in 0..400 {
            store.set_setting(&format!("filler.{i:04}"), &"x".repeat(900)).await.unwrap();
        }
        store.integrity_check().await.unwrap();
    }
    // Every connection closes with the store (the writer thread a moment later); the last one
    // checkpoints the write-ahead log into the file.
    eventually("the write-ahead log checkpointed and removed", async || !path.with_extension("db-wal").exists()).await;
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 64 * 4096, "the registry is large enough to damage mid-file ({len} bytes)");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&vec![0xA5; 3 * 4096]).unwrap();
        f.sync_all().unwrap();
    }
    // It still opens (and reads of the first pages still answer): only the check tells.
    let store = SqliteStore::open(&path).unwrap();
    assert!(store.setting("filler.0000").await.is_ok());
    let found = store.integrity_check().await.unwrap_err();
    assert!(found.to_string().contains("integrity") || found.to_string().contains("malformed"), "{found}");
}

#[tokio::test]
async fn pruning_a_large_trail_goes_chunk_by_chunk_to_the_end() {
    let dir = temp_dir();
    let store = SqliteStore::open(&dir.join("fleetgate.db")).unwrap();
    let old = (0..25_000).map(|i| entry(&format!("o{i}"), "2020-01-01T00:00:00.0000000Z")).collect();
    store.append_audit(old).await.unwrap();
    let new = (0..23_000).map(|i| entry(&format!("n{i}"), "2030-01-01T00:00:00.0000000Z")).collect();
    store.append_audit(new).await.unwrap();
    assert_eq!(store.prune_audit("2025-01-01T00:00:00Z", 1_000).await.unwrap(), 25_000 + 22_000);
    let left = all(&store).await;
    assert_eq!(left.len(), 1_000);
    assert_eq!((left[0].actor.as_str(), left[999].actor.as_str()), ("n22000", "n22999"));
}
