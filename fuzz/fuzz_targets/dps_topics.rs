//! The DPS MQTT vocabulary: CONNECT usernames, request topics and register bodies
//! (`fleetgate_dps::mqtt`).
//!
//! The input is split at the first NUL: username / topic before it, PUBLISH body after it.
//!
//! Invariants: a parsed username has a non-empty scope and registration id, both taken verbatim
//! from the username; a parsed request has a non-empty `$rid` (and operation id) and its response
//! topic starts with the `$rid` query the SDKs parse positionally.

#![no_main]

use fleetgate_dps::mqtt::{parse_request_topic, register_payload, response_topic, DpsRequest, DpsUsername};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let _ = register_payload(body);
    let _ = register_payload(data);
    let Ok(text) = std::str::from_utf8(head) else { return };

    if let Some(u) = DpsUsername::parse(text) {
        assert!(!u.id_scope.is_empty() && !u.registration_id.is_empty());
        assert!(!u.id_scope.contains('/') && !u.registration_id.contains('/'));
        let prefix = format!("{}/registrations/{}", u.id_scope, u.registration_id);
        assert!(text.starts_with(&prefix), "{text:?} does not start with {prefix:?}");
    }

    match parse_request_topic(text) {
        Ok(DpsRequest::Register { rid }) => {
            assert!(!rid.is_empty());
            assert!(response_topic(200, &rid, None).starts_with("$dps/registrations/res/200/?$rid="));
            assert!(response_topic(202, &rid, Some(2)).ends_with("&retry-after=2"));
        }
        Ok(DpsRequest::OperationStatus { rid, operation_id }) => {
            assert!(!rid.is_empty() && !operation_id.is_empty());
        }
        Err(_) => {}
    }
});
