//! The store contract, run against the embedded SQLite store (on disk, to cover reopening).

use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::EnrollmentGroup;
use fleetgate_core::ids::RegistrationId;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::time::Timestamp;
use fleetgate_store::{
    AuditSink, DeviceQueue, DeviceRegistry, EnrollmentStore, EventStream, InstanceStore, LinkedHub, RegistrationStore,
    SqliteStore, StoreError,
};

mod common;
use common::TempPath;

fn new_group(id: &str) -> fleetgate_store::GroupUpdate {
    let id = id.to_owned();
    Box::new(move |cur| {
        EnrollmentGroup::from_request_body(br#"{"attestation":{"type":"symmetricKey"}}"#)?.prepare_upsert(
            &id,
            cur,
            &[],
            Timestamp::now(),
        )
    })
}

fn temp_db() -> (TempPath, SqliteStore) {
    let path = TempPath::file("t.db");
    let s = SqliteStore::open(&path).unwrap();
    (path, s)
}

#[tokio::test]
async fn groups_crud_with_etags_and_case_insensitive_ids() {
    let (path, s) = temp_db();
    let g = s.upsert_group("Grp-1", new_group("Grp-1")).await.unwrap();
    assert_eq!(s.group("grp-1").await.unwrap().unwrap().settings.etag, g.settings.etag);
    s.upsert_group("b", new_group("b")).await.unwrap();
    let ids: Vec<_> = s.groups().await.unwrap().into_iter().map(|g| g.enrollment_group_id).collect();
    assert_eq!(ids, ["Grp-1", "b"]);

    // A refused update writes nothing.
    let refused =
        s.upsert_group("grp-1", Box::new(|_| Err(fleetgate_core::AzureError::bad_request("no")))).await.unwrap_err();
    assert!(matches!(refused, StoreError::Rejected(_)));
    assert_eq!(s.group("GRP-1").await.unwrap().unwrap().settings.etag, g.settings.etag);

    // Delete with a stale etag is refused; with the right one it works.
    let e = s.delete_group("grp-1", Some("\"stale\"")).await.unwrap_err();
    assert!(matches!(e, StoreError::Rejected(ref d) if d.status() == 412));
    assert!(s.delete_group("grp-1", g.settings.etag.as_deref()).await.unwrap());
    assert!(!s.delete_group("grp-1", None).await.unwrap());

    // Survives reopening.
    drop(s);
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.groups().await.unwrap().len(), 1);
}

#[tokio::test]
async fn assignment_commits_record_and_identity_together() {
    let (_p, s) = temp_db();
    s.add_hub(&LinkedHub::new("localhost", "k")).await.unwrap();
    s.add_hub(&LinkedHub::new("LOCALHOST", "other")).await.unwrap();
    assert_eq!(s.hubs().await.unwrap().len(), 1);

    let id = RegistrationId::parse("Dev-1").unwrap();
    let rec = RegistrationRecord::assigned(
        None,
        &id,
        Some("grp"),
        "Dev-1",
        "localhost",
        fleetgate_core::registration::Substatus::InitialAssignment,
        None,
        None,
        Timestamp::now(),
    );
    let dev = DeviceIdentity::provisioned(None, "localhost", "Dev-1", &[SymmetricKey::generate()], Timestamp::now());
    let stored = dev.clone();
    s.commit_assignment(
        &rec,
        "localhost",
        "Dev-1",
        Box::new(move |present| {
            assert!(present.is_none());
            Ok((stored, fleetgate_core::twin::Twin::default()))
        }),
        None,
    )
    .await
    .unwrap();
    // The assignment decides from what is stored, inside the transaction; a refusal rolls the
    // whole assignment back, the record included.
    let mut refused = rec.clone();
    refused.operation_id = "refused-op".into();
    let e = s
        .commit_assignment(
            &refused,
            "LOCALHOST",
            "Dev-1",
            Box::new(|present| {
                assert_eq!(present.map(|(d, _)| d.device_id).as_deref(), Some("Dev-1"));
                Err(fleetgate_core::AzureError::bad_request("no"))
            }),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Rejected(_)));

    let got = s.registration("dev-1").await.unwrap().unwrap();
    assert_eq!(got, rec);
    assert_eq!(got.enrollment_group_id.as_deref(), Some("grp"));
    assert_eq!(s.device("LocalHost", "Dev-1").await.unwrap().unwrap(), dev);
    assert!(s.device("localhost", "dev-1").await.unwrap().is_none(), "device ids are case-sensitive");
    assert_eq!(s.registrations_of_group("GRP", 0, 10).await.unwrap().len(), 1);
    assert_eq!(s.registrations_of_group("grp", 1, 10).await.unwrap().len(), 0);
    assert_eq!(s.registrations_of_group("other", 0, 10).await.unwrap().len(), 0);

    let e = s.delete_registration("dev-1", Some("nope")).await.unwrap_err();
    assert!(matches!(e, StoreError::Rejected(_)));
    assert!(s.delete_registration("DEV-1", Some(&rec.etag)).await.unwrap());
    assert!(s.registration("dev-1").await.unwrap().is_none());
    // Deleting the record leaves the hub identity (as Azure does).
    assert!(s.device("localhost", "Dev-1").await.unwrap().is_some());
}

#[tokio::test]
async fn settings_round_trip() {
    let (_db, s) = temp_db();
    assert_eq!(s.setting("a").await.unwrap(), None);
    s.set_setting("a", "1").await.unwrap();
    s.set_setting("a", "2").await.unwrap();
    assert_eq!(s.setting("a").await.unwrap().as_deref(), Some("2"));
}

/// Telemetry is stored as received and read back decoded. Telemetry an earlier version kept in
/// `telemetry.db` (both of its row formats: the event as JSON, and as received) is moved into
/// the event log with its positions, the table is dropped, and new events continue after it.
#[tokio::test]
async fn events_of_the_older_table_move_into_the_log() {
    use fleetgate_core::message::{Properties, ReceivedEvent, TelemetryEvent};
    let dir = TempPath::dir();
    let old = TelemetryEvent {
        seq: 0,
        hub: "hub.example".into(),
        device_id: "Old-Dev".into(),
        module_id: None,
        enqueued_time: "2026-01-01T00:00:00.1200000Z".into(),
        properties: Properties::from_bag("%24.mid=m1&a=b").unwrap(),
        connection: None,
        body: b"old".to_vec(),
    };
    let received_at = Timestamp::parse_azure("2026-02-01T00:00:00.0000000Z").unwrap();
    {
        let c = rusqlite::Connection::open(dir.join("telemetry.db")).unwrap();
        // The first format, one row; then the second format's columns and a row in it.
        c.execute_batch(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, hub_key TEXT NOT NULL, body TEXT NOT NULL);",
        )
        .unwrap();
        c.execute(
            "INSERT INTO events (hub_key, body) VALUES ('hub.example', ?1)",
            [serde_json::to_string(&old).unwrap()],
        )
        .unwrap();
        c.execute_batch(
            "ALTER TABLE events ADD COLUMN device TEXT; ALTER TABLE events ADD COLUMN time INTEGER;
             ALTER TABLE events ADD COLUMN bag TEXT; ALTER TABLE events ADD COLUMN data BLOB;",
        )
        .unwrap();
        c.execute(
            "INSERT INTO events (seq, hub_key, body, device, time, bag, data) VALUES (5, 'hub.example', '', 'Mid-Dev', ?1, '', X'01')",
            [received_at.ticks()],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&dir.join("t.db")).unwrap();
    let now = Timestamp::now();
    let seqs = s
        .append_events(vec![
            ReceivedEvent {
                hub: "HUB.example".into(),
                device_id: "New-Dev".into(),
                enqueued_time: now,
                bag: "%24.ct=application%2Fjson&x=%20y".into(),
                connection: None,
                body: vec![0, 159, 255],
            },
            ReceivedEvent {
                hub: "other.example".into(),
                device_id: "Elsewhere".into(),
                enqueued_time: now,
                bag: String::new(),
                connection: None,
                body: Vec::new(),
            },
        ])
        .await
        .unwrap();
    assert_eq!(seqs, [6, 7], "new events come after the moved ones");
    // Events are read back under the hub name asked for.
    let check = |hub: &str, got: Vec<TelemetryEvent>| {
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], TelemetryEvent { seq: 1, hub: hub.into(), ..old.clone() });
        assert_eq!((got[1].seq, got[1].device_id.as_str(), got[1].body.as_slice()), (5, "Mid-Dev", &[1u8][..]));
        assert_eq!(got[1].enqueued_time, received_at.to_azure_string());
        let new = &got[2];
        assert_eq!((new.seq, new.hub.as_str(), new.device_id.as_str()), (6, hub, "New-Dev"));
        assert_eq!(new.enqueued_time, now.to_azure_string());
        assert_eq!(new.properties.system["content-type"], "application/json");
        assert_eq!(new.properties.application["x"], " y");
        assert_eq!(new.body, [0, 159, 255]);
    };
    let page = s.events("Hub.Example", 0, 10).await.unwrap();
    assert_eq!(page.next, 8);
    check("Hub.Example", page.events);
    let other = s.events("other.example", 2, 10).await.unwrap();
    assert_eq!((other.events.len(), other.events[0].seq, other.events[0].device_id.as_str()), (1, 7, "Elsewhere"));
    assert_eq!(s.last_event_seq().await.unwrap(), 7);
    drop(s);

    // Reopened: the table is gone and nothing is moved twice.
    let c = rusqlite::Connection::open(dir.join("telemetry.db")).unwrap();
    let tables: i64 =
        c.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'events'", [], |r| r.get(0)).unwrap();
    assert_eq!(tables, 0);
    let s = SqliteStore::open(&dir.join("t.db")).unwrap();
    check("hub.example", s.events("hub.example", 0, 10).await.unwrap().events);
    assert_eq!(s.last_event_seq().await.unwrap(), 7);
}

/// Below the free-space reserve, telemetry and registry changes are refused as `Unavailable`
/// (answered 503 / no PUBACK: retryable), nothing is written, and reads still work.
#[tokio::test]
async fn writes_are_refused_retryably_below_the_disk_reserve() {
    let (path, s) = temp_db();
    s.set_setting("k", "v").await.unwrap();
    drop(s);
    let options = fleetgate_store::EventLogOptions { reserve_bytes: u64::MAX, ..Default::default() };
    let s = SqliteStore::open_with(&path, options).unwrap();
    let event = fleetgate_core::message::ReceivedEvent {
        hub: "h".into(),
        device_id: "d".into(),
        enqueued_time: Timestamp::now(),
        bag: String::new(),
        connection: None,
        body: b"x".to_vec(),
    };
    assert!(matches!(s.append_events(vec![event]).await, Err(StoreError::Unavailable(_))));
    assert!(matches!(s.set_setting("k", "w").await, Err(StoreError::Unavailable(_))));
    assert_eq!(s.setting("k").await.unwrap().as_deref(), Some("v"), "nothing written, reads work");
    assert_eq!(s.last_event_seq().await.unwrap(), 0);
}

/// The databases and their -wal/-shm are owner-only, also when the process umask is not.
#[cfg(unix)]
#[tokio::test]
async fn database_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (path, s) = temp_db();
    s.set_setting("k", "v").await.unwrap();
    s.append_audit(Vec::new()).await.unwrap();
    let dir = path.parent().unwrap();
    let mut seen = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            seen += 1;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
        }
    }
    assert!(seen >= 4, "t.db, its -wal and -shm, telemetry.db: {seen}");
}

/// What `serve` checks before opening an initialized registry: the stored ID scope, without
/// creating anything; none when the tables are gone.
#[tokio::test]
async fn stored_id_scope_reads_without_creating() {
    let (path, s) = temp_db();
    assert_eq!(SqliteStore::stored_id_scope(&path).unwrap(), None);
    s.set_setting("id_scope", "0ne00000001").await.unwrap();
    assert_eq!(SqliteStore::stored_id_scope(&path).unwrap().as_deref(), Some("0ne00000001"));
    let missing = path.with_file_name("missing.db");
    assert!(SqliteStore::stored_id_scope(&missing).is_err());
    assert!(!missing.exists(), "not created");
    let empty_tables = path.with_file_name("other.db");
    rusqlite::Connection::open(&empty_tables).unwrap().execute_batch("CREATE TABLE x (a)").unwrap();
    assert_eq!(SqliteStore::stored_id_scope(&empty_tables).unwrap(), None);
    let garbage = path.with_file_name("garbage.db");
    std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
    assert!(SqliteStore::stored_id_scope(&garbage).is_err());
}

/// Registry statistics are counted by the store, per hub; the hub query reads twins in order.
#[tokio::test]
async fn device_counts_and_twins_per_hub() {
    let (_db, s) = temp_db();
    assert_eq!(s.device_counts("hub-a").await.unwrap(), fleetgate_store::DeviceCounts::default());
    for (hub, id, status) in [
        ("hub-a", "d1", fleetgate_core::device::DeviceStatus::Enabled),
        ("hub-a", "d2", fleetgate_core::device::DeviceStatus::Disabled),
        ("hub-a", "d3", fleetgate_core::device::DeviceStatus::Enabled),
        ("hub-b", "d1", fleetgate_core::device::DeviceStatus::Disabled),
    ] {
        let mut dev = DeviceIdentity::provisioned(None, hub, id, &[SymmetricKey::generate()], Timestamp::now());
        dev.status = status;
        s.update_device(hub, id, Box::new(move |_| Ok(Some((dev, fleetgate_core::twin::Twin::default())))))
            .await
            .unwrap();
    }
    assert_eq!(s.device_counts("HUB-A").await.unwrap(), fleetgate_store::DeviceCounts { total: 3, enabled: 2 });
    assert_eq!(s.device_counts("hub-b").await.unwrap(), fleetgate_store::DeviceCounts { total: 1, enabled: 0 });
    let page: Vec<_> = s.twins("hub-a", 1, 5).await.unwrap().into_iter().map(|(d, _)| d.device_id).collect();
    assert_eq!(page, ["d2", "d3"]);
}

fn identity(hub: &str, id: &str) -> DeviceIdentity {
    DeviceIdentity::provisioned(None, hub, id, &[SymmetricKey::generate()], Timestamp::now())
}

async fn put_device(s: &SqliteStore, hub: &str, id: &str) {
    let dev = identity(hub, id);
    s.update_device(hub, id, Box::new(move |_| Ok(Some((dev, fleetgate_core::twin::Twin::default()))))).await.unwrap();
}

fn c2d(hub: &str, id: &str, msg: &str) -> fleetgate_core::message::C2dMessage {
    fleetgate_core::message::C2dMessage {
        id: msg.into(),
        hub: hub.into(),
        device_id: id.into(),
        enqueued_time: Timestamp::now().to_azure_string(),
        expiry: Timestamp::now().unix_seconds() + 600,
        properties: Default::default(),
        body: msg.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Issue 14 item 3: the queue's length is counted per device, expired messages left out, and
/// completing a message takes it off the count.
#[tokio::test]
async fn c2d_count_is_the_unexpired_queue_of_the_device() {
    let (_db, s) = temp_db();
    put_device(&s, "hub-a", "d1").await;
    put_device(&s, "hub-a", "D1").await;
    for i in 0..3 {
        s.enqueue_c2d(&c2d("hub-a", "d1", &format!("m{i}")), 50).await.unwrap();
    }
    let mut old = c2d("hub-a", "d1", "expired");
    old.expiry = Timestamp::now().unix_seconds() - 10;
    s.enqueue_c2d(&old, 50).await.unwrap();
    let now = Timestamp::now().unix_seconds();
    assert_eq!(s.c2d_count("hub-a", "d1", now).await.unwrap(), 3);
    assert_eq!(s.c2d_count("HUB-A", "d1", now).await.unwrap(), 3, "host names are case-insensitive");
    assert_eq!(s.c2d_count("hub-a", "D1", now).await.unwrap(), 0, "device ids are not");
    assert!(s.complete_c2d("hub-a", "d1", "m1").await.unwrap());
    assert_eq!(s.c2d_count("hub-a", "d1", now).await.unwrap(), 2);
}

/// Issue 13 item 4: device ids are case-sensitive (IoT Hub's rule), hub host names are not.
#[tokio::test]
async fn device_ids_are_case_sensitive_and_host_names_are_not() {
    let (_db, s) = temp_db();
    put_device(&s, "hub-a", "Dev-1").await;
    put_device(&s, "hub-a", "dev-1").await;
    let ids: Vec<_> = s.devices("hub-a", 0, 10).await.unwrap().into_iter().map(|d| d.device_id).collect();
    assert_eq!(ids, ["Dev-1", "dev-1"], "two devices");
    assert_eq!(s.device("HUB-A", "Dev-1").await.unwrap().unwrap().device_id, "Dev-1");
    assert!(s.device("hub-a", "DEV-1").await.unwrap().is_none());
    s.enqueue_c2d(&c2d("hub-a", "Dev-1", "for-upper"), 50).await.unwrap();
    let now = Timestamp::now().unix_seconds();
    assert!(s.pending_c2d("hub-a", "dev-1", now).await.unwrap().is_empty(), "queues are per device");
    assert_eq!(s.pending_c2d("hub-a", "Dev-1", now).await.unwrap().len(), 1);
    s.update_device("hub-a", "dev-1", Box::new(|_| Ok(None))).await.unwrap();
    assert!(s.device("hub-a", "Dev-1").await.unwrap().is_some(), "deleting dev-1 leaves Dev-1");
}

/// Issue 13 item 4: a registry written when device ids were stored lower-cased is migrated on
/// open: each device (with its C2D queue and MQTT session) is found by its id as created, and
/// the migration runs once.
#[tokio::test]
async fn lower_cased_device_keys_of_an_older_registry_are_migrated() {
    let (path, s) = temp_db();
    put_device(&s, "hub-a", "Mixed-Case").await;
    s.enqueue_c2d(&c2d("hub-a", "Mixed-Case", "queued"), 50).await.unwrap();
    s.set_mqtt_session("hub-a", "Mixed-Case", Some("{\"twin\":1}")).await.unwrap();
    drop(s);
    {
        // What the previous version wrote: keys lower-cased, schema version 0.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "UPDATE devices SET device_key = lower(device_key); UPDATE c2d SET device_key = lower(device_key);
             UPDATE mqtt_sessions SET device_key = lower(device_key); PRAGMA user_version = 0;",
        )
        .unwrap();
        let keys: String = c.query_row("SELECT group_concat(device_key) FROM devices", [], |r| r.get(0)).unwrap();
        assert_eq!(keys, "mixed-case");
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.device("hub-a", "Mixed-Case").await.unwrap().unwrap().device_id, "Mixed-Case");
    assert!(s.device("hub-a", "mixed-case").await.unwrap().is_none());
    let now = Timestamp::now().unix_seconds();
    assert_eq!(s.pending_c2d("hub-a", "Mixed-Case", now).await.unwrap().len(), 1, "the queue follows its device");
    assert_eq!(s.mqtt_session("hub-a", "Mixed-Case").await.unwrap().as_deref(), Some("{\"twin\":1}"));
    drop(s);
    let c = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).unwrap(), 1);
}

/// A registry from a newer version is not opened (and so not changed) by an older one.
#[tokio::test]
async fn a_registry_of_a_newer_schema_is_refused() {
    let (path, s) = temp_db();
    drop(s);
    rusqlite::Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99;").unwrap();
    let err = SqliteStore::open(&path).err().expect("refused").to_string();
    assert!(err.contains("newer Fleetgate"), "{err}");
}

/// Issue 14 item 12: feedback records are durable — made in the same change that removes the
/// message, still there after the store is reopened, locked per receive, gone once completed.
#[tokio::test]
async fn c2d_feedback_is_durable_and_locked_per_batch() {
    use fleetgate_core::feedback::{AckMode, Outcome};
    use fleetgate_store::C2dSettlement;
    let (path, s) = temp_db();
    put_device(&s, "hub-a", "dev-1").await;
    let now = Timestamp::now().unix_seconds();
    for (id, ack) in [("m-full", AckMode::Full), ("m-none", AckMode::None), ("m-neg", AckMode::Negative)] {
        s.enqueue_c2d(&fleetgate_core::message::C2dMessage { ack, ..c2d("hub-a", "dev-1", id) }, 50).await.unwrap();
    }
    assert!(s.complete_c2d("hub-a", "dev-1", "m-full").await.unwrap());
    assert!(s.complete_c2d("hub-a", "dev-1", "m-none").await.unwrap());
    let m = s.receive_c2d("hub-a", "dev-1", &lock(now, "lock-1")).await.unwrap().unwrap();
    assert_eq!((m.id.as_str(), m.delivery_count), ("m-neg", 1));
    assert!(!s.settle_c2d("hub-a", "dev-1", "lock-other", C2dSettlement::Reject, now).await.unwrap());
    assert!(s.settle_c2d("hub-a", "dev-1", "lock-1", C2dSettlement::Reject, now).await.unwrap());
    drop(s);
    let s = SqliteStore::open(&path).unwrap();
    let batch = s.receive_feedback("HUB-A", &lock(now, "fb-1"), now - 3600, 100).await.unwrap().unwrap();
    let got: Vec<_> = batch.records.iter().map(|r| (r.original_message_id.as_str(), r.status_code)).collect();
    assert_eq!(got, [("m-full", Outcome::Success), ("m-neg", Outcome::Rejected)]);
    assert!(s.receive_feedback("hub-a", &lock(now, "fb-2"), now - 3600, 100).await.unwrap().is_none());
    assert!(s.settle_feedback("hub-a", "fb-1", true, now).await.unwrap());
    assert!(!s.settle_feedback("hub-a", "fb-1", true, now).await.unwrap());
    assert!(s.receive_feedback("hub-a", &lock(now, "fb-3"), now - 3600, 100).await.unwrap().is_none());
}

/// A 60-second lock under `token`, with Azure's delivery limit of 10.
fn lock(now: i64, token: &str) -> fleetgate_store::Lock {
    fleetgate_store::Lock { now, until: now + 60, token: token.into(), max_deliveries: 10 }
}
