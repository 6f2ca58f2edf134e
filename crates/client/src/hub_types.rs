//! The hub service API's JSON as Rust types (api-version 2021-04-12), named as Azure names them.
//! Members not modelled are kept in `extra`, so an identity read and written back loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::dps_types::Extra;

/// A device identity in the hub's registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// The device's id.
    pub device_id: String,
    /// `enabled` or `disabled` (a disabled device cannot connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Why the status was set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// `Connected` or `Disconnected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// How the device authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<DeviceAuthentication>,
    /// The identity's version; pass it as `If-Match` to update only what you read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Distinguishes identities that reused a deleted device's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    /// Cloud-to-device messages queued for the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    /// When the device was last seen (ISO 8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// Members not modelled here (`capabilities`, `connectionStateUpdatedTime`, ...).
    #[serde(flatten)]
    pub extra: Extra,
}

impl Device {
    /// An enabled device with symmetric keys the hub generates.
    pub fn with_generated_keys(device_id: impl Into<String>) -> Self {
        Self {
            device_id: device_id.into(),
            status: Some("enabled".into()),
            authentication: Some(DeviceAuthentication {
                kind: "sas".into(),
                symmetric_key: Some(Default::default()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// `authentication` of a device identity.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceAuthentication {
    /// `sas`, `selfSigned`, `certificateAuthority` or `none`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The device's keys, for `sas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<crate::dps_types::SymmetricKeyAttestation>,
    /// Certificate thumbprints, for `selfSigned`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<Value>,
    /// Members not modelled here.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A device twin: tags, desired and reported properties.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// The device's id.
    pub device_id: String,
    /// The twin's version for `If-Match`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The twin's version number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The service's tags (never seen by the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Value>,
    /// Desired and reported properties.
    #[serde(default)]
    pub properties: TwinProperties,
    /// `enabled` or `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `Connected` or `Disconnected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// Members not modelled here.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A twin's `properties`: each a JSON object with `$version` and `$metadata`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinProperties {
    /// What the service wants the device to be.
    #[serde(default)]
    pub desired: Value,
    /// What the device says it is.
    #[serde(default)]
    pub reported: Value,
}

/// A direct method's answer: the device's status code and payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    /// The status the device answered with.
    pub status: i64,
    /// The device's payload (`null` when none).
    #[serde(default)]
    pub payload: Value,
}

/// A telemetry message as the hub's event stream gives it (az's `monitor-events` shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryEvent {
    /// Position in the hub's stream (pass it as `from` to resume).
    #[serde(default)]
    pub seq: u64,
    /// The message.
    pub event: EventBody,
}

/// The message inside a [`TelemetryEvent`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventBody {
    /// The device that sent it.
    pub origin: String,
    /// The module that sent it (empty for the device itself).
    #[serde(default)]
    pub module: String,
    /// Its system (`message-id`, `content-type`, ...) and application properties.
    #[serde(default)]
    pub properties: EventProperties,
    /// The hub's annotations (`iothub-enqueuedtime`, ...).
    #[serde(default)]
    pub annotations: BTreeMap<String, Value>,
    /// The body: its JSON, or its text, or (with `payload_encoding` `base64`) base64 of bytes
    /// that are not UTF-8.
    #[serde(default)]
    pub payload: Value,
    /// `base64` when `payload` is base64 text of a binary body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_encoding: Option<String>,
    /// Members not modelled here (`interface`, `component`).
    #[serde(flatten)]
    pub extra: Extra,
}

/// System and application properties of a message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventProperties {
    /// System properties under their stream names (`message-id`, `content-type`, ...).
    #[serde(default)]
    pub system: BTreeMap<String, Value>,
    /// Application properties as the device sent them.
    #[serde(default)]
    pub application: BTreeMap<String, Value>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn azure_names() {
        let wire = json!({
            "deviceId": "dev-1", "generationId": "g", "etag": "e", "connectionState": "Disconnected",
            "status": "enabled", "cloudToDeviceMessageCount": 0,
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "AA==", "secondaryKey": "BB=="}, "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}},
            "capabilities": {"iotEdge": false}
        });
        let d: Device = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(d.authentication.as_ref().unwrap().kind, "sas");
        assert_eq!(d.cloud_to_device_message_count, Some(0));
        assert_eq!(serde_json::to_value(&d).unwrap(), wire);
        let m: MethodResult = serde_json::from_value(json!({"status": 200, "payload": {"ok": true}})).unwrap();
        assert_eq!((m.status, m.payload["ok"].as_bool()), (200, Some(true)));
        let t: Twin = serde_json::from_value(
            json!({"deviceId": "d", "properties": {"desired": {"a": 1}, "reported": {}}, "version": 3}),
        )
        .unwrap();
        assert_eq!((t.properties.desired["a"].as_i64(), t.version), (Some(1), Some(3)));
    }
}
