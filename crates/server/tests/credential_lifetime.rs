//! A connection lives no longer than the credentials it was opened with: a hub connection is
//! closed when its SAS token expires, when the device's keys are changed through the service
//! API, and when DPS re-provisioning gives the identity other keys or moves it to another hub; a
//! DPS connection when its token expires. (X.509 connections: tests/x509.rs.)

mod common;

use common::{dps_username, Mqtt, TestServer};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::{build_token, MAX_CLOCK_SKEW_SECS};
use fleetgate_core::time::Timestamp;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;
use serde_json::json;

const V: &str = "?api-version=2021-04-12";

/// Connects `id` with a token expiring at `expiry` (Unix seconds).
async fn connect_until(s: &TestServer, id: &str, key: &SymmetricKey, expiry: i64) -> Result<Mqtt, ConnectReturnCode> {
    connect_to(s, &s.hub(), id, key, expiry).await
}

/// Connects `id` to `hub` with a token expiring at `expiry` (Unix seconds).
async fn connect_to(
    s: &TestServer,
    hub: &str,
    id: &str,
    key: &SymmetricKey,
    expiry: i64,
) -> Result<Mqtt, ConnectReturnCode> {
    let token = build_token(key, &format!("{hub}/devices/{id}"), expiry, None);
    let mut m = s.mqtt().await;
    match m.connect(id, &format!("{hub}/{id}/?api-version=2019-10-01"), Some(&token), true, 60).await {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(m),
        Packet::ConnAck(a) => Err(a.code),
        other => panic!("{other:?}"),
    }
}

/// Telemetry at QoS 1 is acknowledged: the connection is open and serving.
async fn assert_serving(m: &mut Mqtt, id: &str) {
    m.publish(&format!("devices/{id}/messages/events/"), QoS::AtLeastOnce, 5, b"x").await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(a)) if a.pkid == 5), "telemetry acknowledged");
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    // A token that a CONNECT accepts for about 2 s more (clock skew allowance included).
    let expiry = Timestamp::now().unix_seconds() - MAX_CLOCK_SKEW_SECS + 2;
    let mut m = connect_until(&s, "dev-1", &key, expiry).await.expect("accepted while within its lifetime");
    assert_serving(&mut m, "dev-1").await;
    // Keep-alive 60 s: only the token's expiry can close it within `recv`'s 10 s.
    assert!(m.recv().await.is_none(), "the server closed the connection at the token's expiry");
    assert_eq!(connect_until(&s, "dev-1", &key, expiry).await.err(), Some(ConnectReturnCode::NotAuthorized));
    // A fresh token connects again, as the SDKs do.
    let mut m = connect_until(&s, "dev-1", &key, Timestamp::now().unix_seconds() + 3600).await.unwrap();
    assert_serving(&mut m, "dev-1").await;
}

#[tokio::test]
async fn a_connection_is_closed_when_the_device_keys_change() {
    let s = TestServer::start().await;
    let old = s.create_device("dev-1").await;
    let put = |body: serde_json::Value| {
        s.http()
            .put(s.url(&format!("/devices/dev-1{V}")))
            .header("Authorization", s.hub_token())
            .header("If-Match", "*")
            .json(&body)
            .send()
    };
    let mut m = connect_until(&s, "dev-1", &old, Timestamp::now().unix_seconds() + 3600).await.unwrap();
    assert_serving(&mut m, "dev-1").await;
    // An update that keeps the keys (status only, no keys given) leaves the connection open.
    let resp = put(json!({"deviceId": "dev-1", "status": "enabled"})).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_serving(&mut m, "dev-1").await;

    // Both keys regenerated: the connection opened with the old key is closed.
    let new = SymmetricKey::generate();
    let body = json!({"deviceId": "dev-1", "authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": new.to_base64(), "secondaryKey": SymmetricKey::generate().to_base64()}}});
    assert_eq!(put(body).await.unwrap().status(), 200);
    assert!(m.recv().await.is_none(), "closed when the keys changed");
    let fresh = Timestamp::now().unix_seconds() + 3600;
    assert_eq!(connect_until(&s, "dev-1", &old, fresh).await.err(), Some(ConnectReturnCode::NotAuthorized));
    let mut m = connect_until(&s, "dev-1", &new, fresh).await.expect("the new key connects");
    assert_serving(&mut m, "dev-1").await;

    // Only the secondary key regenerated: closed too (the connection may have used it).
    let body = json!({"deviceId": "dev-1", "authentication": {"type": "sas", "symmetricKey": {
        "primaryKey": new.to_base64(), "secondaryKey": SymmetricKey::generate().to_base64()}}});
    assert_eq!(put(body).await.unwrap().status(), 200);
    assert!(m.recv().await.is_none(), "closed when the secondary key changed");
}

#[tokio::test]
async fn a_dps_connection_is_closed_when_its_token_expires() {
    let s = TestServer::start().await;
    let (group_key, _) = s.create_group("grp", json!({})).await;
    let key = group_key.derive_device_key("dev-1");
    // Accepted for about 5 s more (clock skew allowance included): time for one registration.
    let expiry = Timestamp::now().unix_seconds() - MAX_CLOCK_SKEW_SECS + 5;
    let token = build_token(&key, &format!("{}/registrations/dev-1", s.scope()), expiry, None);
    let mut m = s.mqtt().await;
    m.connect("dev-1", &dps_username(&s.scope(), "dev-1"), Some(&token), true, 60).await;
    m.subscribe_dps().await;
    m.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtLeastOnce, 1, b" ").await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let (topic, body) = m.expect_publish().await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "registered while the token is valid: {topic} {body}");
    // Keep-alive 60 s: only the token's expiry can close it within `recv`'s 10 s.
    assert!(m.recv().await.is_none(), "the server closed the connection at the token's expiry");
}

/// Rolls a group's keys as `fleetgate enrollment-group roll-keys` does: a new primary, the old
/// primary becomes the secondary. Returns the new primary.
async fn roll_group_keys(s: &TestServer, group: &str, old_primary: &SymmetricKey) -> SymmetricKey {
    let mut g = s.service().get_enrollment_group(group).await.unwrap();
    let new = SymmetricKey::generate();
    g["attestation"] = json!({"type": "symmetricKey", "symmetricKey": {
        "primaryKey": new.to_base64(), "secondaryKey": old_primary.to_base64()}});
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    new
}

#[tokio::test]
async fn a_hub_connection_is_closed_when_reprovisioning_gives_the_device_new_keys() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp", json!({})).await;
    let old = primary.derive_device_key("dev-1");
    let (_, body) = s.register("dev-1", &old, None).await;
    assert_eq!(body["status"], "assigned", "{body}");
    let fresh = Timestamp::now().unix_seconds() + 3600;
    let mut m = connect_until(&s, "dev-1", &old, fresh).await.unwrap();
    assert_serving(&mut m, "dev-1").await;
    // Registering again with the same keys changes nothing the connection depends on.
    let (_, body) = s.register("dev-1", &old, None).await;
    assert_eq!(body["status"], "assigned", "{body}");
    assert_serving(&mut m, "dev-1").await;

    // The group's keys are rolled and the device registers with its new derived key: the hub
    // identity gets the new keys, and the connection opened with the old one is closed. (The
    // old key is the secondary now, so it may connect again until the next roll.)
    let rolled = roll_group_keys(&s, "grp", &primary).await;
    let new = rolled.derive_device_key("dev-1");
    let (_, body) = s.register("dev-1", &new, None).await;
    assert_eq!(body["status"], "assigned", "{body}");
    assert!(m.recv().await.is_none(), "closed when re-provisioning replaced the keys");
    let mut m = connect_until(&s, "dev-1", &old, fresh).await.expect("the old primary is the secondary now");
    assert_serving(&mut m, "dev-1").await;

    // Rolled again: the old key is gone from the group, and from the hub once the device
    // registers; its connection ends with it.
    let newest = roll_group_keys(&s, "grp", &rolled).await.derive_device_key("dev-1");
    let (_, body) = s.register("dev-1", &newest, None).await;
    assert_eq!(body["status"], "assigned", "{body}");
    assert!(m.recv().await.is_none(), "closed when the key it was opened with left the identity");
    assert_eq!(connect_until(&s, "dev-1", &old, fresh).await.err(), Some(ConnectReturnCode::NotAuthorized));
    let mut m = connect_until(&s, "dev-1", &newest, fresh).await.expect("the newest key connects");
    assert_serving(&mut m, "dev-1").await;
}

#[tokio::test]
async fn a_hub_connection_is_closed_when_reprovisioning_moves_the_device_to_another_hub() {
    let s = TestServer::start().await;
    s.add_hub("hub-b", 1).await;
    let a = s.hub();
    let (primary, _) = s
        .create_group(
            "grp",
            json!({"iotHubHostName": a, "allocationPolicy": "static",
                   "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true}}),
        )
        .await;
    let key = primary.derive_device_key("dev-1");
    let (_, body) = s.register("dev-1", &key, None).await;
    assert_eq!(body["registrationState"]["assignedHub"], a, "{body}");
    let fresh = Timestamp::now().unix_seconds() + 3600;
    let mut m = connect_to(&s, &a, "dev-1", &key, fresh).await.unwrap();
    assert_serving(&mut m, "dev-1").await;

    // The operator moves the group to hub B and the device registers again: its identity leaves
    // hub A, and so does its connection there.
    let mut g = s.service().get_enrollment_group("grp").await.unwrap();
    g["iotHubHostName"] = "hub-b".into();
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    let (_, body) = s.register("dev-1", &key, None).await;
    assert_eq!(body["registrationState"]["assignedHub"], "hub-b", "{body}");
    assert!(m.recv().await.is_none(), "closed on the hub the device left");
    assert_eq!(connect_to(&s, &a, "dev-1", &key, fresh).await.err(), Some(ConnectReturnCode::NotAuthorized));
    let mut m = connect_to(&s, "hub-b", "dev-1", &key, fresh).await.expect("the device connects to hub B");
    assert_serving(&mut m, "dev-1").await;
}

/// Reads an event stream until `want` appears (`true`) or the server ends it (`false`).
async fn stream_shows(resp: &mut reqwest::Response, want: &str) -> bool {
    let read = async {
        let mut text = String::new();
        while let Some(chunk) = resp.chunk().await.unwrap_or(None) {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains(want) {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .expect("the stream neither showed it nor ended")
}

/// Opens the hub's event stream (new events only, no timeout) with `token`.
async fn event_stream(s: &TestServer, token: &str) -> reqwest::Response {
    let resp =
        s.http().get(s.url(&format!("/messages/events{V}"))).header("Authorization", token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// The service side's long-lived call, the telemetry stream, ends with the credentials it was
/// opened with too: a renewed policy key (the operator's way to revoke a leaked one) stops it.
#[tokio::test]
async fn an_event_stream_ends_when_its_policy_key_is_renewed() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    let mut events = event_stream(&s, &s.hub_token()).await;
    m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 1, b"before-renewal").await;
    m.recv().await;
    assert!(stream_shows(&mut events, "before-renewal").await);
    s.service().renew_policy_key(Some(&s.hub()), "iothubowner", false).await.unwrap();
    m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 2, b"after-renewal").await;
    m.recv().await;
    assert!(!stream_shows(&mut events, "after-renewal").await, "telemetry flowed to a revoked key");
}

#[tokio::test]
async fn an_event_stream_ends_when_its_token_expires() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    let c: fleetgate_client::ConnectionString = s.running().instance.hubs[0].connection_string.parse().unwrap();
    // Accepted (clock skew included) for about 3 s more.
    let expiry = Timestamp::now().unix_seconds() - MAX_CLOCK_SKEW_SECS + 3;
    let mut events = event_stream(&s, &build_token(&c.key, &c.host_name, expiry, Some(&c.key_name))).await;
    // Time must pass: the token expires (whole seconds) in about 3 s.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 1, b"after-expiry").await;
    m.recv().await;
    assert!(!stream_shows(&mut events, "after-expiry").await, "telemetry flowed past the token's expiry");
}

/// A DPS connection does not outlive the key it was opened with: a token's expiry is the
/// signer's choice (a leaked group key signs tokens for years), so replacing the group's keys
/// must stop the registrations of connections opened with the old ones.
#[tokio::test]
async fn a_dps_connection_opened_with_replaced_group_keys_registers_no_more() {
    let s = TestServer::start().await;
    let (group_key, _) = s.create_group("grp", json!({})).await;
    let key = group_key.derive_device_key("dev-1");
    let token = build_token(&key, &format!("{}/registrations/dev-1", s.scope()), i64::from(i32::MAX), None);
    let mut m = s.mqtt().await;
    m.connect("dev-1", &dps_username(&s.scope(), "dev-1"), Some(&token), true, 60).await;
    m.subscribe_dps().await;
    let register = async |m: &mut Mqtt, rid: u16| {
        m.publish(&format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"), QoS::AtLeastOnce, rid, b" ").await;
        assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
        m.expect_publish().await
    };
    let (topic, body) = register(&mut m, 1).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "{topic} {body}");
    // The operator replaces both of the group's keys (the old ones leaked).
    let mut g = s.service().get_enrollment_group("grp").await.unwrap();
    g["attestation"] = json!({"type": "symmetricKey", "symmetricKey": {
        "primaryKey": SymmetricKey::generate().to_base64(), "secondaryKey": SymmetricKey::generate().to_base64()}});
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    let (topic, body) = register(&mut m, 2).await;
    assert!(topic.starts_with("$dps/registrations/res/401/"), "registered with a withdrawn key: {topic} {body}");
}
