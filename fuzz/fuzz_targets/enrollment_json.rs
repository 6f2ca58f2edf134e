//! Service API bodies for `PUT /enrollmentGroups/{id}` and `PUT /enrollments/{id}`:
//! `from_request_body`, then `prepare_upsert` (validation, keys, X.509 certificates, initial
//! twin, allocation settings) as `dps::management` runs them (`fleetgate_core::enrollment`).
//!
//! The input is `{path id}\n{JSON body}` (no newline: the body alone, path `grp-1`).
//!
//! Invariants: what `prepare_upsert` accepts reads back from its stored JSON unchanged (rows hold
//! the JSON); the GET view shows no symmetric key; a PUT of the GET view succeeds and keeps the
//! keys and the trusted certificates (a client that did GET then PUT never saw the keys).

#![no_main]

use fleetgate_core::enrollment::{EnrollmentGroup, IndividualEnrollment};
use fleetgate_core::time::Timestamp;
use libfuzzer_sys::fuzz_target;

fn linked() -> Vec<String> {
    ["myhub.azure-devices.net", "hub-a.example", "hub-b.example", "localhost"].map(String::from).to_vec()
}

fn no_keys_in(json: &[u8], keys: &[fleetgate_core::keys::SymmetricKey]) {
    let text = String::from_utf8_lossy(json);
    for k in keys {
        assert!(!text.contains(&k.to_base64()), "the GET view shows a key");
    }
}

fuzz_target!(|data: &[u8]| {
    let (path, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (String::from_utf8_lossy(&data[..i]).into_owned(), &data[i + 1..]),
        None => ("grp-1".to_owned(), data),
    };
    let (t0, t1) = (Timestamp::from_unix_seconds(1_700_000_000), Timestamp::from_unix_seconds(1_700_000_060));

    if let Ok(g) = EnrollmentGroup::from_request_body(body).and_then(|g| g.prepare_upsert(&path, None, &linked(), t0)) {
        assert!(g.enrollment_group_id.eq_ignore_ascii_case(&path));
        let stored = serde_json::to_vec(&g).expect("serializes");
        let read = EnrollmentGroup::from_request_body(&stored).expect("a stored group reads back");
        assert_eq!(serde_json::to_vec(&read).unwrap(), stored, "a stored group changes when read");
        let view = serde_json::to_vec(&g.redacted()).unwrap();
        no_keys_in(&view, &g.keys());
        let again = EnrollmentGroup::from_request_body(&view)
            .and_then(|r| r.prepare_upsert(&path, Some(&g), &linked(), t1))
            .unwrap_or_else(|e| panic!("PUT of the GET view refused: {}", e.message));
        assert_eq!(again.keys(), g.keys());
        assert_eq!(again.settings.x509_trust(), g.settings.x509_trust());
        assert_eq!(again.settings.created_date_time_utc, g.settings.created_date_time_utc);
    }

    if let Ok(e) =
        IndividualEnrollment::from_request_body(body).and_then(|e| e.prepare_upsert(&path, None, &linked(), t0))
    {
        assert!(e.registration_id.eq_ignore_ascii_case(&path));
        let stored = serde_json::to_vec(&e).expect("serializes");
        let read = IndividualEnrollment::from_request_body(&stored).expect("a stored enrollment reads back");
        assert_eq!(serde_json::to_vec(&read).unwrap(), stored, "a stored enrollment changes when read");
        let view = serde_json::to_vec(&e.redacted()).unwrap();
        no_keys_in(&view, &e.keys());
        let again = IndividualEnrollment::from_request_body(&view)
            .and_then(|r| r.prepare_upsert(&path, Some(&e), &linked(), t1))
            .unwrap_or_else(|err| panic!("PUT of the GET view refused: {}", err.message));
        assert_eq!(again.keys(), e.keys());
        assert_eq!(again.settings.x509_trust(), e.settings.x509_trust());
        assert_eq!(again.device_id, e.device_id);
    }
});
