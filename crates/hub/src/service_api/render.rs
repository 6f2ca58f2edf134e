//! Azure's JSON for what the hub service API answers: device identities, twins, statistics and
//! telemetry events. The hub's types know nothing of these shapes.

use base64::Engine;
use fleetgate_core::device::{AuthenticationType, DeviceIdentity};
use fleetgate_core::message::{AuthMethod, ConnectionAuth, TelemetryEvent};
use fleetgate_core::twin::Twin;
use fleetgate_store::DeviceCounts;
use serde_json::{json, Value};

use crate::registry::DeviceState;
use crate::twins::twin_etag;

/// Azure's "never", for a time that has not happened (since the server started).
const NEVER: &str = "0001-01-01T00:00:00Z";

/// Azure's `Device`.
pub fn device(dev: &DeviceIdentity, state: &DeviceState) -> Value {
    json!({
        "deviceId": dev.device_id,
        "generationId": dev.generation_id,
        "etag": dev.etag,
        "connectionState": if state.connected { "Connected" } else { "Disconnected" },
        "status": dev.status,
        "statusReason": dev.status_reason,
        "connectionStateUpdatedTime": state.state_updated.as_deref().unwrap_or(NEVER),
        "statusUpdatedTime": dev.created_date_time_utc,
        "lastActivityTime": last_activity(state),
        "cloudToDeviceMessageCount": state.c2d_queued,
        "authentication": authentication(dev),
        "capabilities": {"iotEdge": false},
    })
}

fn last_activity(state: &DeviceState) -> String {
    state.last_activity.map_or_else(|| NEVER.to_owned(), |t| t.to_azure_string())
}

/// Azure's `Twin`.
pub fn twin(dev: &DeviceIdentity, twin: &Twin, state: &DeviceState) -> Value {
    let (tags, properties) = twin.service_sections();
    let auth = authentication(dev);
    json!({
        "deviceId": dev.device_id,
        "etag": twin_etag(twin),
        "deviceEtag": dev.etag,
        "status": dev.status,
        "statusReason": dev.status_reason,
        "statusUpdateTime": dev.created_date_time_utc,
        "connectionState": if state.connected { "Connected" } else { "Disconnected" },
        "lastActivityTime": last_activity(state),
        "cloudToDeviceMessageCount": state.c2d_queued,
        "authenticationType": auth["type"],
        "x509Thumbprint": auth["x509Thumbprint"],
        "version": twin.version,
        "tags": tags,
        "properties": properties,
        "capabilities": {"iotEdge": false},
    })
}

/// Azure's `AuthenticationMechanism` of a device identity.
fn authentication(dev: &DeviceIdentity) -> Value {
    let key = |k: &str| if k.is_empty() { Value::Null } else { Value::String(k.to_owned()) };
    let kind = match dev.authentication_type {
        AuthenticationType::Sas => "sas",
        AuthenticationType::SelfSigned => "selfSigned",
        AuthenticationType::CertificateAuthority => "certificateAuthority",
        AuthenticationType::None => "none",
    };
    json!({
        "symmetricKey": {"primaryKey": key(&dev.primary_key), "secondaryKey": key(&dev.secondary_key)},
        "x509Thumbprint": {"primaryThumbprint": dev.primary_thumbprint, "secondaryThumbprint": dev.secondary_thumbprint},
        "type": kind,
    })
}

/// Azure's `RegistryStatistics`.
pub fn registry_statistics(c: &DeviceCounts) -> Value {
    json!({
        "totalDeviceCount": c.total,
        "enabledDeviceCount": c.enabled,
        "disabledDeviceCount": c.total.saturating_sub(c.enabled),
    })
}

/// Azure's `ServiceStatistics`.
pub fn service_statistics(connected: usize) -> Value {
    json!({"connectedDeviceCount": connected})
}

/// An event as `az iot hub monitor-events --properties all` prints it, plus its position. A
/// body that is not UTF-8 is its base64 text, with `"payloadEncoding": "base64"` beside it: a
/// marker inside the payload (such as `{"base64": ...}`) could be a JSON body of that shape.
pub fn event(e: &TelemetryEvent) -> Value {
    let (payload, binary) = match serde_json::from_slice::<Value>(&e.body) {
        Ok(v) => (v, false),
        Err(_) => match std::str::from_utf8(&e.body) {
            Ok(s) => (Value::String(s.to_owned()), false),
            Err(_) => (Value::String(base64::engine::general_purpose::STANDARD.encode(&e.body)), true),
        },
    };
    // A property sent without a value is `null`, one sent as `key=` is `""` (as Azure keeps them).
    let application: serde_json::Map<String, Value> =
        e.properties.application_values().map(|(k, v)| (k.to_owned(), v.map_or(Value::Null, Value::from))).collect();
    let mut v = json!({
        "seq": e.seq,
        "event": {
            "origin": e.device_id,
            "module": e.module_id.clone().unwrap_or_default(),
            "interface": e.properties.system.get("iothub-interface-id").cloned().unwrap_or_default(),
            "component": e.properties.system.get("dt-subject").cloned().unwrap_or_default(),
            "properties": {"system": e.properties.system, "application": application},
            "annotations": {
                "iothub-connection-device-id": e.device_id,
                "iothub-enqueuedtime": e.enqueued_time,
                "iothub-message-source": "Telemetry",
                "x-opt-sequence-number": e.seq,
            },
            "payload": payload,
        }
    });
    // Events stored before the connection was recorded have neither annotation.
    if let Some(c) = &e.connection {
        let annotations = &mut v["event"]["annotations"];
        annotations["iothub-connection-auth-method"] = auth_method(c).into();
        annotations["iothub-connection-auth-generation-id"] = c.generation_id.clone().into();
    }
    if binary {
        v["event"]["payloadEncoding"] = "base64".into();
    }
    v
}

/// Azure's `iothub-connection-auth-method`: a JSON object serialized into a string, as the
/// Event Hubs-compatible endpoint delivers it, with its keys in Azure's order. SAS form from
/// Azure's documented monitor-events output; the X.509 form from Azure's connection logs
/// (`"type":"x509Certificate","issuer":"external"`), for thumbprint and CA devices alike.
fn auth_method(c: &ConnectionAuth) -> String {
    let (scope, kind, issuer) = match c.method {
        AuthMethod::Sas => ("device", "sas", "iothub"),
        AuthMethod::X509SelfSigned | AuthMethod::X509Ca => ("device", "x509Certificate", "external"),
        // A hub policy's token acting for the device: scoped to the hub, as Azure names it.
        AuthMethod::HubPolicy => ("hub", "sas", "iothub"),
    };
    format!(r#"{{"scope":"{scope}","type":"{kind}","issuer":"{issuer}","acceptingIpFilterRule":null}}"#)
}
