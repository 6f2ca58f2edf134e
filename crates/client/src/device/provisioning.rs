//! Registering a device with DPS over MQTT, as the Python SDK (`azure-iot-device` 2.14) does it.
//!
//! CONNECT (client id = registration id, username `{scope}/registrations/{id}/api-version=...`,
//! password = SAS for `{scope}/registrations/{id}` without `skn`), SUBSCRIBE
//! `$dps/registrations/res/#`, PUBLISH the register request, then follow the answers: `assigned`
//! ends it, `assigning` means poll the operation status after `retry-after`, 429 and 5xx mean
//! send the same request again after `retry-after`, other errors end it.

use std::time::Duration;

use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use percent_encoding::percent_decode_str;
use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
use serde_json::Value;

use super::{pct, Connection, DeviceError, Pump, RegistrationState, CLIENT_VERSION, DEFAULT_MQTT_PORT, TOKEN_TTL_SECS};

/// The DPS device API version the Python SDK speaks.
pub const API_VERSION: &str = "2019-03-31";
/// The only topic filter DPS accepts.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
/// Wait before re-sending or polling when the service gives no `retry-after`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Everything one registration needs.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// Address to connect to (host name or IP).
    pub host: String,
    /// MQTT-over-TLS port (8883 by default).
    pub port: u16,
    /// Name the server certificate must carry; `None` means `host`.
    pub server_name: Option<String>,
    /// PEM of the CA to trust (Fleetgate's `ca.pem`); nothing else is trusted.
    pub ca_pem: Vec<u8>,
    /// The DPS instance's ID scope (Fleetgate's `idScope` in `instance.json`).
    pub id_scope: String,
    /// The device's registration id (for a group: any id; its key derives from it).
    pub registration_id: String,
    /// The device's key (for enrollment groups: derived from the group key).
    pub device_key: SymmetricKey,
    /// Custom JSON payload sent with the request (`null` when `None`).
    pub payload: Option<Value>,
    /// Limit for the whole registration, connection included.
    pub timeout: Duration,
}

impl RegisterOptions {
    /// Port 8883, server name = host, no payload, 60 s timeout.
    pub fn new(
        host: impl Into<String>,
        ca_pem: Vec<u8>,
        id_scope: impl Into<String>,
        registration_id: impl Into<String>,
        device_key: SymmetricKey,
    ) -> Self {
        Self {
            host: host.into(),
            port: DEFAULT_MQTT_PORT,
            server_name: None,
            ca_pem,
            id_scope: id_scope.into(),
            registration_id: registration_id.into(),
            device_key,
            payload: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A successful registration: where the device lives now.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrationResult {
    /// The DPS operation that assigned the device.
    pub operation_id: String,
    /// Always `assigned`.
    pub status: String,
    /// The registration id the device registered with.
    pub registration_id: String,
    /// The hub to connect to next ([`HubOptions::hub_host_name`](super::HubOptions::hub_host_name)).
    pub assigned_hub: String,
    /// The device's id in that hub.
    pub device_id: String,
    /// `initialAssignment`, `deviceDataMigrated`, ...
    pub substatus: Option<String>,
    /// When the device first registered (ISO 8601).
    pub created_date_time_utc: Option<String>,
    /// When the registration last changed (ISO 8601).
    pub last_updated_date_time_utc: Option<String>,
    /// The registration record's version.
    pub etag: Option<String>,
    /// The custom allocation payload returned to the device, if any.
    pub payload: Option<Value>,
    /// The service's `registrationState` (members not modelled are in its `extra`, such as
    /// `symmetricKey.enrollmentGroupId`).
    pub registration_state: RegistrationState,
}

/// `{scope}/registrations/{id}/api-version=2019-03-31&ClientVersion=fleetgate-client%2F0.1.0`
/// (no `?`, unlike the hub's).
pub fn username(id_scope: &str, registration_id: &str) -> String {
    format!(
        "{id_scope}/registrations/{registration_id}/api-version={API_VERSION}&ClientVersion={}",
        pct(CLIENT_VERSION)
    )
}

/// The resource the device's SAS token is for.
pub fn sas_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// The MQTT password: a SAS token for [`sas_resource`], Python's form (encoded `sr`, no `skn`).
pub fn password(key: &SymmetricKey, id_scope: &str, registration_id: &str, expiry_unix_secs: i64) -> String {
    build_token(key, &sas_resource(id_scope, registration_id), expiry_unix_secs, None)
}

/// The topic of a register request with request id `rid`.
pub fn register_topic(rid: &str) -> String {
    format!("$dps/registrations/PUT/iotdps-register/?$rid={}", pct(rid))
}

/// The topic of an operation status poll.
pub fn poll_topic(rid: &str, operation_id: &str) -> String {
    format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={}&operationId={}", pct(rid), pct(operation_id))
}

/// Python's `json.dumps({...}, sort_keys=True)`: `{"payload": null, "registrationId": "x"}`.
pub fn register_body(registration_id: &str, payload: Option<&Value>) -> String {
    let payload = payload.map(|p| p.to_string()).unwrap_or_else(|| "null".into());
    format!("{{\"payload\": {payload}, \"registrationId\": {}}}", Value::from(registration_id))
}

/// A response topic, `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={n}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTopic {
    /// The answer's status (200, 202, 401, 429, ...).
    pub status: u16,
    /// The request id it answers.
    pub rid: String,
    /// How long the service asked to wait before polling or retrying.
    pub retry_after: Option<Duration>,
}

/// Reads a response topic; `None` for any other topic.
pub fn parse_response_topic(topic: &str) -> Option<ResponseTopic> {
    let rest = topic.strip_prefix("$dps/registrations/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let (mut rid, mut retry_after) = (None, None);
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode_str(v).decode_utf8().ok()?.into_owned();
        match k {
            "$rid" => rid = Some(v),
            k if k.eq_ignore_ascii_case("retry-after") => retry_after = v.parse().ok().map(Duration::from_secs),
            _ => {}
        }
    }
    Some(ResponseTopic { status, rid: rid?, retry_after })
}

enum Request {
    Register,
    Poll(String),
}

/// Registers one device. Resolves when the service has assigned it, or with the reason it did not.
pub async fn register(o: &RegisterOptions) -> Result<RegistrationResult, DeviceError> {
    match tokio::time::timeout(o.timeout, run(o)).await {
        Ok(r) => r,
        Err(_) => Err(DeviceError::Timeout),
    }
}

async fn run(o: &RegisterOptions) -> Result<RegistrationResult, DeviceError> {
    let expiry = Timestamp::now().unix_seconds() + TOKEN_TTL_SECS;
    let (client, el) = Connection {
        host: &o.host,
        port: o.port,
        server_name: o.server_name.as_deref(),
        ca_pem: &o.ca_pem,
        client_id: &o.registration_id,
        username: username(&o.id_scope, &o.registration_id),
        password: password(&o.device_key, &o.id_scope, &o.registration_id, expiry),
        clean_session: false,
        keep_alive: Duration::from_secs(60),
        max_packet_bytes: 128 * 1024,
        timeout: o.timeout,
    }
    .event_loop()?;
    let mut pump = Pump::spawn(el);
    let result = exchange(&client, &mut pump, o).await;
    // Say goodbye politely when the connection is still up; never wait long for it.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(ev) = pump.next().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    tracing::debug!(registration_id = %o.registration_id, ok = result.is_ok(), "registration finished");
    result
}

async fn exchange(
    client: &rumqttc::AsyncClient,
    pump: &mut Pump,
    o: &RegisterOptions,
) -> Result<RegistrationResult, DeviceError> {
    let closed = |_| DeviceError::Disconnected;
    // Connected (the event loop reports refusals and TLS failures as errors).
    while !matches!(pump.next().await?, Event::Incoming(Packet::ConnAck(_))) {}
    client.try_subscribe(RESPONSE_FILTER, QoS::AtLeastOnce).map_err(closed)?;
    loop {
        if let Event::Incoming(Packet::SubAck(s)) = pump.next().await? {
            if s.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                return Err(DeviceError::Protocol(format!(
                    "the service refused the subscription to {RESPONSE_FILTER}"
                )));
            }
            break;
        }
    }

    let mut request = Request::Register;
    loop {
        let rid = uuid::Uuid::new_v4().to_string();
        let (topic, body) = match &request {
            Request::Register => (register_topic(&rid), register_body(&o.registration_id, o.payload.as_ref())),
            Request::Poll(op) => (poll_topic(&rid, op), " ".to_owned()),
        };
        client.try_publish(topic, QoS::AtLeastOnce, false, body).map_err(closed)?;
        let (resp, payload) = loop {
            if let Event::Incoming(Packet::Publish(p)) = pump.next().await? {
                match parse_response_topic(&p.topic) {
                    Some(r) if r.rid == rid => break (r, p.payload),
                    _ => tracing::debug!(topic = %p.topic, "ignoring an unrelated publish"),
                }
            }
        };
        let wait = resp.retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
        let text = String::from_utf8_lossy(&payload);
        let body: Option<Value> =
            if text.trim().is_empty() { Some(Value::Null) } else { serde_json::from_str(&text).ok() };
        tracing::debug!(registration_id = %o.registration_id, status = resp.status, "DPS answered");

        if resp.status == 429 || resp.status >= 500 {
            // Throttled or a server error: the same request again, as every SDK does.
            tokio::time::sleep(wait).await;
            continue;
        }
        if resp.status >= 300 {
            let body = body.unwrap_or_else(|| Value::String(text.trim().to_owned()));
            return Err(DeviceError::from_status(resp.status, resp.retry_after, body));
        }
        let body = body.ok_or_else(|| DeviceError::Protocol(format!("response body is not JSON: {text}")))?;
        let status = body.get("status").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
        let state = body.get("registrationState").cloned().unwrap_or(Value::Null);
        match status.as_str() {
            "assigned" => return assigned(&body, state),
            "assigning" | "unassigned" => {
                let op = body
                    .get("operationId")
                    .and_then(Value::as_str)
                    .ok_or_else(|| DeviceError::Protocol(format!("'{status}' response without an operationId")))?;
                request = Request::Poll(op.to_owned());
                tokio::time::sleep(wait).await;
            }
            "failed" | "disabled" => {
                let registration_state = Box::new(decode_state(state)?);
                return Err(DeviceError::RegistrationFailed { status, registration_state });
            }
            _ => return Err(DeviceError::Protocol(format!("unexpected registration status '{status}'"))),
        }
    }
}

fn decode_state(state: Value) -> Result<RegistrationState, DeviceError> {
    serde_json::from_value(state).map_err(|e| DeviceError::Protocol(format!("registrationState: {e}")))
}

fn assigned(body: &Value, state: Value) -> Result<RegistrationResult, DeviceError> {
    let state = decode_state(state)?;
    let required = |v: &Option<String>, k: &str| {
        v.clone().ok_or_else(|| DeviceError::Protocol(format!("assigned without registrationState.{k}")))
    };
    Ok(RegistrationResult {
        operation_id: body.get("operationId").and_then(Value::as_str).unwrap_or_default().to_owned(),
        status: "assigned".into(),
        registration_id: state.registration_id.clone(),
        assigned_hub: required(&state.assigned_hub, "assignedHub")?,
        device_id: required(&state.device_id, "deviceId")?,
        substatus: state.substatus.clone(),
        created_date_time_utc: state.created_date_time_utc.clone(),
        last_updated_date_time_utc: state.last_updated_date_time_utc.clone(),
        etag: state.etag.clone(),
        payload: state.payload.clone().filter(|p| !p.is_null()),
        registration_state: state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_and_token_are_pythons() {
        assert_eq!(
            username("0ne00000001", "dev-001"),
            format!(
                "0ne00000001/registrations/dev-001/api-version=2019-03-31&ClientVersion=fleetgate-client%2F{}",
                env!("CARGO_PKG_VERSION")
            )
        );
        // Vector A1 of wire-examples.md: the Python SDK's token for this key, resource and expiry.
        let key = SymmetricKey::from_base64("SV+2SImDP9Vx9XL3ACWx9N9ZFlb6ue3jKrTWmct/YVk=").unwrap();
        assert_eq!(
            password(&key, "0ne00000001", "dev-001", 1_700_000_000),
            "SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fdev-001&sig=fN4FZ1Kio8sXHI9yXOBL8ZWQnYrB7aae8QoYjB83HDo%3D&se=1700000000"
        );
    }

    #[test]
    fn topics_and_bodies() {
        assert_eq!(register_topic("abc-1"), "$dps/registrations/PUT/iotdps-register/?$rid=abc-1");
        assert_eq!(
            poll_topic("r1", "4.d0a6.e717/x y"),
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r1&operationId=4.d0a6.e717%2Fx%20y"
        );
        assert_eq!(register_body("dev-1", None), r#"{"payload": null, "registrationId": "dev-1"}"#);
        assert_eq!(
            register_body("dev-1", Some(&serde_json::json!({"a": 1}))),
            r#"{"payload": {"a":1}, "registrationId": "dev-1"}"#
        );
    }

    #[test]
    fn response_topics() {
        assert_eq!(
            parse_response_topic("$dps/registrations/res/202/?$rid=1&retry-after=3"),
            Some(ResponseTopic { status: 202, rid: "1".into(), retry_after: Some(Duration::from_secs(3)) })
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/200/?$rid=a%20b"),
            Some(ResponseTopic { status: 200, rid: "a b".into(), retry_after: None })
        );
        assert_eq!(parse_response_topic("$dps/registrations/res/200/?x=1"), None);
        assert_eq!(parse_response_topic("$dps/registrations/res/abc/?$rid=1"), None);
        assert_eq!(parse_response_topic("devices/x/messages/devicebound/"), None);
    }
}
