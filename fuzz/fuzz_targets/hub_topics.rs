//! The IoT hub MQTT vocabulary: CONNECT usernames, PUBLISH topics and SUBSCRIBE filters
//! (`fleetgate_hub::mqtt`).
//!
//! Invariants: telemetry is only ever accepted on the connected device's own topic; another
//! device's topic is `Forbidden`, never accepted; rids are bounded; the only C2D subscription
//! granted is the device's own; subscription names round-trip.

#![no_main]

use fleetgate_hub::mqtt::{parse_publish_topic, subscription, DeviceRequest, HubUsername, Subscription};
use libfuzzer_sys::fuzz_target;

const DEVICE: &str = "dev-001";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };

    if let Some(u) = HubUsername::parse(text) {
        assert!(!u.host_name.is_empty() && !u.device_id.is_empty());
        assert!(!u.host_name.contains('/') && !u.device_id.contains('/'));
        assert!(!u.host_name.contains(char::is_whitespace));
        assert!(text.starts_with(&format!("{}/{}", u.host_name, u.device_id)));
        if let Some(m) = &u.module_id {
            assert!(!m.is_empty() && !m.contains('/'));
        }
    }

    // As the connected device, and as a device whose id is a prefix of the topic's.
    for device in [DEVICE, "dev-00", text.split('/').nth(1).unwrap_or("")] {
        if device.is_empty() {
            continue;
        }
        match parse_publish_topic(text, device) {
            Ok(DeviceRequest::Telemetry { bag }) => {
                let own = format!("devices/{device}/messages/events");
                assert!(text.starts_with(&own), "telemetry accepted on {text:?} for {device:?}");
                assert!(text.ends_with(&bag));
            }
            Ok(DeviceRequest::TwinGet { rid })
            | Ok(DeviceRequest::TwinPatchReported { rid })
            | Ok(DeviceRequest::MethodResponse { rid, .. }) => {
                assert!(!rid.is_empty() && rid.len() <= 128);
            }
            Err(_) => {}
        }
        match subscription(text, device) {
            Some(Subscription::CloudToDevice) => {
                assert!(text.starts_with(&format!("devices/{device}/messages/devicebound/")));
            }
            Some(s) => assert_eq!(Subscription::from_name(s.name()), Some(s)),
            None => {}
        }
    }
    let _ = Subscription::from_name(text);
});
