//! The service APIs' query subset (`fleetgate_core::query`): DPS enrollment, group and
//! registration queries and the hub's twin query, sent by any caller with a read right.
//!
//! The input is a query text; a NUL, if any, separates a JSON document to match it against.
//!
//! Invariants: any text is parsed or refused, never a panic; a parsed query has at most
//! `MAX_CONDITIONS` conditions, each with a non-empty path of non-empty names; `*` (alone) is for
//! every collection; matching any document answers without panicking, and a query without
//! conditions matches everything.

#![no_main]

use fleetgate_core::query::{parse, MAX_CONDITIONS};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let mut pieces = data.splitn(2, |b| *b == 0);
    let Ok(text) = std::str::from_utf8(pieces.next().unwrap_or_default()) else { return };
    let doc: Value = pieces.next().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or_else(|| {
        json!({"deviceId": "d1", "status": "enabled", "tags": {"site": "north"},
            "properties": {"reported": {"fw": "1.0"}}, "attestation": {"type": "symmetricKey"}})
    });
    let Ok(q) = parse(text) else { return };
    assert!(q.conditions.len() <= MAX_CONDITIONS);
    assert!(q.conditions.iter().all(|c| !c.path.is_empty() && c.path.iter().all(|n| !n.is_empty())));
    if q.collection.is_none() {
        assert!(q.conditions.is_empty() && q.is_for("devices"));
    }
    let m = q.matches(&doc);
    if q.conditions.is_empty() {
        assert!(m, "a query without conditions matches everything");
    }
});
