//! Telemetry property bags: the percent-encoded `k=v&k2` tail of a device's event topic
//! (`fleetgate_core::message::{parse_bag, check_bag, Properties}`).
//!
//! Invariants: at most `MAX_PROPERTIES` pairs, no empty key; a bag that parses re-encodes and
//! parses to the same pairs; `check_bag` (what ingestion runs; the bag is stored as sent) accepts
//! exactly what `Properties::from_bag` (what reading the stream runs) decodes, so nothing stored
//! fails to read back; `Properties` that decode re-encode (`to_bag`, what C2D topics carry) and
//! decode to the same maps.

#![no_main]

use fleetgate_core::message::{check_bag, encode_component, parse_bag, Properties, MAX_PROPERTIES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(bag) = std::str::from_utf8(data) else { return };

    if let Ok(pairs) = parse_bag(bag) {
        assert!(pairs.len() <= MAX_PROPERTIES);
        assert!(pairs.iter().all(|(k, _)| !k.is_empty()));
        let encoded = pairs
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{}={}", encode_component(k), encode_component(v)),
                None => encode_component(k),
            })
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(parse_bag(&encoded).as_ref(), Ok(&pairs), "re-encoded as {encoded:?}");
    }

    let decoded = Properties::from_bag(bag);
    assert_eq!(check_bag(bag).is_ok(), decoded.is_ok(), "check_bag and from_bag disagree");
    if let Ok(p) = decoded {
        assert!(p.application.keys().all(|k| !k.starts_with("$.")));
        let again = p.to_bag();
        assert_eq!(Properties::from_bag(&again).as_ref(), Ok(&p), "to_bag gave {again:?}");
    }
});
