//! Device twins: a device's reported-properties patch (MQTT), a service's tags / desired patch
//! (REST) and an enrollment's or webhook's `initialTwin` (`fleetgate_core::twin`).
//!
//! The input is NUL-separated: an initial twin, then patches applied in turn to reported,
//! desired and tags.
//!
//! Invariants: a refused patch changes nothing; an accepted one bumps its version by one; every
//! stored section stays within Azure's rules — it is itself a valid patch (key characters,
//! nesting, string lengths) and within its size limit — and the twin reads back from its JSON;
//! the `$metadata` shown dates every member of the desired and reported properties.

#![no_main]

use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::{parse_patch, Twin, MAX_SECTION_BYTES, MAX_TAGS_BYTES};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn check_section(name: &str, section: &Map<String, Value>, limit: usize) {
    let bytes = serde_json::to_vec(section).expect("a section serializes");
    assert!(bytes.len() <= limit, "{name} is {} bytes", bytes.len());
    match parse_patch(&bytes) {
        Ok(again) => assert_eq!(again.len(), section.len(), "{name} has members a patch would drop"),
        Err(e) => panic!("stored {name} breaks the twin rules ({}): {}", e.message, String::from_utf8_lossy(&bytes)),
    }
}

/// Every member of `section`, at every level, has its node in `meta`, dated.
fn check_metadata(section: &Value, meta: &Value) {
    assert!(meta["$lastUpdated"].is_string(), "undated metadata node: {meta}");
    if let Value::Object(m) = section {
        for (k, v) in m.iter().filter(|(k, _)| !k.starts_with('$')) {
            check_metadata(v, &meta[k]);
        }
    }
}

fn check(t: &Twin) {
    check_section("tags", &t.tags, MAX_TAGS_BYTES);
    check_section("desired", &t.desired, MAX_SECTION_BYTES);
    check_section("reported", &t.reported, MAX_SECTION_BYTES);
    let json = serde_json::to_vec(t).expect("a twin serializes");
    let _: Twin = serde_json::from_slice(&json).expect("a stored twin reads back");
    let view = t.device_view();
    for section in ["desired", "reported"] {
        check_metadata(&view[section], &view[section]["$metadata"]);
    }
    let _ = t.service_sections();
}

fuzz_target!(|data: &[u8]| {
    let mut pieces = data.split(|b| *b == 0);
    let initial: Option<Value> = pieces.next().and_then(|p| serde_json::from_slice(p).ok());
    let Ok(mut twin) = Twin::from_initial(initial.as_ref()) else { return };
    twin.date_undated(&Timestamp::from_unix_seconds(0).to_azure_string());
    check(&twin);
    for (i, piece) in pieces.enumerate() {
        let Ok(patch) = parse_patch(piece) else { continue };
        assert!(patch.keys().all(|k| !k.starts_with('$')));
        let before = twin.clone();
        let now = Timestamp::from_unix_seconds(i as i64 + 1);
        let ok = match i % 3 {
            0 => twin.patch_reported(&patch, now).map(|v| assert_eq!(v, before.reported_version + 1)).is_ok(),
            1 => twin.patch_desired(&patch, now).map(|v| assert_eq!(v, before.desired_version + 1)).is_ok(),
            _ => twin.patch_tags(&patch).is_ok(),
        };
        if ok {
            assert_eq!(twin.version, before.version + 1);
            let _ = Twin::desired_notification(&patch, twin.desired_version);
        } else {
            assert_eq!(twin, before, "a refused patch changed the twin");
        }
        check(&twin);
    }
});
