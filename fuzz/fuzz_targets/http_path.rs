//! HTTP request paths on port 443, folded by `fleetgate_rest::canonical_path` before
//! routing (SDKs disagree on `enrollmentGroups` vs `enrollmentgroups`).
//!
//! Invariants: idempotent; only ASCII case changes (same length, same segments, equal ignoring
//! ASCII case); a segment that changed is one of the route literals; ids keep their spelling.

#![no_main]

use fleetgate_rest::canonical_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let once = canonical_path(path);
    assert_eq!(canonical_path(&once), once, "not idempotent for {path:?}");
    assert_eq!(once.len(), path.len());
    assert!(once.eq_ignore_ascii_case(path));
    for (a, b) in path.split('/').zip(once.split('/')) {
        if a != b {
            assert_eq!(b, a.to_ascii_lowercase());
            assert!(b.chars().all(|c| c.is_ascii_lowercase()), "folded a non-literal segment {a:?}");
        }
    }
});
