//! The service APIs' query subset (`fleetgate_core::query`): DPS enrollment, group and
//! registration queries and the hub's twin query, sent by any caller with a read right.
//!
//! The input is a query text; a NUL, if any, separates a JSON document to match it against.
//!
//! Invariants: any text is parsed or refused, never a panic; a parsed `WHERE` has at most
//! `MAX_CONDITIONS` comparisons and `IN` lists, each with a non-empty path of non-empty names, and
//! nests at most `MAX_DEPTH` levels of parentheses and `NOT`; `*` (alone) is for every
//! collection; matching any document answers without panicking, and a query without a `WHERE`
//! matches everything.

#![no_main]

use fleetgate_core::query::{parse, Expr, MAX_CONDITIONS, MAX_DEPTH};
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
    if let Some(f) = &q.filter {
        assert!(leaves(f, 0) <= MAX_CONDITIONS);
    }
    if q.collection.is_none() {
        assert!(q.filter.is_none() && q.is_for("devices"));
    }
    let m = q.matches(&doc);
    if q.filter.is_none() {
        assert!(m, "a query without WHERE matches everything");
    }
});

/// The comparisons and lists under `e`, checking each path and the nesting on the way.
fn leaves(e: &Expr, depth: usize) -> usize {
    // Binary AND/OR chains are not nesting the caller wrote; bound them by the leaf count instead.
    assert!(depth <= MAX_DEPTH + MAX_CONDITIONS);
    let path_ok = |p: &[String]| !p.is_empty() && p.iter().all(|n| !n.is_empty());
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => leaves(a, depth + 1) + leaves(b, depth + 1),
        Expr::Not(x) => leaves(x, depth + 1),
        Expr::Compare(c) => {
            assert!(path_ok(&c.path));
            1
        }
        Expr::In { path, values, .. } => {
            assert!(path_ok(path) && !values.is_empty());
            1
        }
    }
}
