//! A custom allocation webhook's answer (`fleetgate_core::allocation::parse_custom_allocation_response`),
//! then what the registration does with it: the chosen hub checked against the enrollment
//! (`check_custom_choice`) and the returned `initialTwin` turned into the device's twin.
//!
//! Invariants: an accepted answer names a non-empty hub; the hub the check accepts is a linked
//! one (same name, any case); null twins and payloads are absent.

#![no_main]

use fleetgate_core::allocation::{check_custom_choice, parse_custom_allocation_response, HubCandidate};
use fleetgate_core::enrollment::EnrollmentGroup;
use fleetgate_core::twin::Twin;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = parse_custom_allocation_response(data) else { return };
    assert!(!answer.iot_hub_host_name.is_empty());
    assert!(answer.initial_twin.as_ref().is_none_or(|t| !t.is_null()));
    assert!(answer.payload.as_ref().is_none_or(|p| !p.is_null()));

    let hubs: Vec<HubCandidate> = ["hub-a.example", "hub-b.example"].into_iter().map(HubCandidate::new).collect();
    let group = EnrollmentGroup::from_request_body(
        br#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"custom","iotHubs":["hub-b.example"],
            "customAllocationDefinition":{"webhookUrl":"https://alloc.example/api","apiVersion":"2021-10-01"}}"#,
    )
    .expect("fixed enrollment");
    if let Ok(hub) = check_custom_choice(&group.settings, &hubs, &answer.iot_hub_host_name) {
        assert_eq!(hub, "hub-b.example");
        assert!(hub.eq_ignore_ascii_case(&answer.iot_hub_host_name));
    }
    if let Some(t) = &answer.initial_twin {
        let _ = Twin::from_initial(Some(t));
    }
});
