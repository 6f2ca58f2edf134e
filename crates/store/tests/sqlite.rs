//! The store contract, run against the embedded SQLite store (on disk, to cover reopening).

use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::EnrollmentGroup;
use fleetgate_core::ids::RegistrationId;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::time::Timestamp;
use fleetgate_store::{LinkedHub, SqliteStore, Store, StoreError};

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

fn temp_db() -> (std::path::PathBuf, SqliteStore) {
    let dir = std::env::temp_dir().join(format!("fg-store-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.db");
    let s = SqliteStore::open(&path).unwrap();
    (path, s)
}

fn uuid_like() -> String {
    format!("{}-{:x}", std::process::id(), rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
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
        s.upsert_group("grp-1", Box::new(|_| Err(fleetgate_core::DpsError::bad_request("no")))).await.unwrap_err();
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
    s.commit_assignment(&rec, &dev, Some(&fleetgate_core::twin::Twin::default()), None).await.unwrap();

    let got = s.registration("dev-1").await.unwrap().unwrap();
    assert_eq!(got, rec);
    assert_eq!(got.enrollment_group_id.as_deref(), Some("grp"));
    assert_eq!(s.device("localhost", "DEV-1").await.unwrap().unwrap(), dev);
    assert_eq!(s.registrations_of_group("GRP", 0, 10).await.unwrap().len(), 1);
    assert_eq!(s.registrations_of_group("grp", 1, 10).await.unwrap().len(), 0);
    assert_eq!(s.registrations_of_group("other", 0, 10).await.unwrap().len(), 0);

    let e = s.delete_registration("dev-1", Some("nope")).await.unwrap_err();
    assert!(matches!(e, StoreError::Rejected(_)));
    assert!(s.delete_registration("DEV-1", Some(&rec.etag)).await.unwrap());
    assert!(s.registration("dev-1").await.unwrap().is_none());
    // Deleting the record leaves the hub identity (as Azure does).
    assert!(s.device("localhost", "dev-1").await.unwrap().is_some());
}

#[tokio::test]
async fn settings_round_trip() {
    let s = SqliteStore::in_memory().unwrap();
    assert_eq!(s.setting("a").await.unwrap(), None);
    s.set_setting("a", "1").await.unwrap();
    s.set_setting("a", "2").await.unwrap();
    assert_eq!(s.setting("a").await.unwrap().as_deref(), Some("2"));
}
