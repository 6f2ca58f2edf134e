//! Request/response pairing at the hub, tried by an attacker: a direct method's answer counts
//! only from the connection the call was sent to (never another device's, another hub's or a
//! guessed one), and request ids or topics that would reshape a response topic are refused.

mod common;

use common::{device_token, dps_username, Mqtt, TestServer};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::Twin;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const V: &str = "?api-version=2021-04-12";

/// Invokes `reboot` on `device` of the instance's first hub in the background.
fn invoke(s: &TestServer, device: &str, timeout: u64) -> JoinHandle<(u16, Value)> {
    let (http, url, token) = (s.http(), s.url(&format!("/twins/{device}/methods{V}")), s.hub_token());
    tokio::spawn(async move {
        let r = http
            .post(url)
            .header("Authorization", token)
            .json(&json!({"methodName": "reboot", "payload": {}, "responseTimeoutInSeconds": timeout}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    })
}

/// A device connected to `hub` (by host name) and listening for direct methods.
async fn method_listener(s: &TestServer, hub: &str, id: &str, key: &SymmetricKey) -> Mqtt {
    let token = build_token(key, &format!("{hub}/devices/{id}"), Timestamp::now().unix_seconds() + 3600, None);
    let mut m = s.mqtt().await;
    match m.connect(id, &format!("{hub}/{id}/?api-version=2019-10-01"), Some(&token), true, 60).await {
        Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("{other:?}"),
    }
    m.subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce, 1).await;
    m
}

/// The rid of the next method call the device receives.
async fn method_rid(m: &mut Mqtt) -> String {
    let p = m.next_publish().await;
    p.topic.strip_prefix("$iothub/methods/POST/reboot/?$rid=").expect("a reboot call, rid last").to_owned()
}

/// Publishes a method answer at QoS 1 and waits until the server has handled it (its PUBACK,
/// then a PINGRESP: the session handles one packet at a time).
async fn answer(m: &mut Mqtt, rid: &str, status: u16, body: Value) {
    m.publish(&format!("$iothub/methods/res/{status}/?$rid={rid}"), QoS::AtLeastOnce, 9, body.to_string().as_bytes())
        .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(a)) if a.pkid == 9), "answer acknowledged");
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
}

#[tokio::test]
async fn a_method_answer_counts_only_from_the_device_the_call_went_to() {
    let s = TestServer::start().await;
    let (ka, kb) = (s.create_device("dev-a").await, s.create_device("dev-b").await);
    let mut a = method_listener(&s, &s.hub(), "dev-a", &ka).await;
    let mut b = method_listener(&s, &s.hub(), "dev-b", &kb).await;

    let call = invoke(&s, "dev-a", 20);
    let rid = method_rid(&mut a).await;
    // B learnt A's rid (the strongest attacker: guessing 128 bits is out of reach) and answers
    // first, then guesses the small numbers a counter would have used.
    answer(&mut b, &rid, 200, json!({"forged": true})).await;
    for guess in ["1", "2", "3"] {
        answer(&mut b, guess, 200, json!({"forged": true})).await;
    }
    answer(&mut a, &rid, 201, json!({"real": true})).await;
    let (status, body) = call.await.unwrap();
    assert_eq!((status, body), (200, json!({"status": 201, "payload": {"real": true}})));
    assert!(rid.len() >= 32 && rid.bytes().all(|c| c.is_ascii_hexdigit()), "an unguessable rid: {rid}");

    // A device that never answers: the caller times out, whatever another device says.
    let call = invoke(&s, "dev-a", 5);
    let rid = method_rid(&mut a).await;
    answer(&mut b, &rid, 200, json!({"forged": true})).await;
    let (status, body) = call.await.unwrap();
    assert_eq!((status, body["errorCode"].as_u64()), (504, Some(504101)), "{body}");
}

#[tokio::test]
async fn a_method_answer_from_another_hub_or_an_older_connection_does_not_count() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    // The same device id on a second hub of the instance, owned by the attacker.
    s.add_hub("hub-b", 1).await;
    let other_key = SymmetricKey::generate();
    let twin = Twin::default();
    let dev = fleetgate_core::device::DeviceIdentity::provisioned(
        None,
        "hub-b",
        "dev-1",
        std::slice::from_ref(&other_key),
        Timestamp::now(),
    );
    fleetgate_store::DeviceRegistry::update_device(
        &s.store(),
        "hub-b",
        "dev-1",
        Box::new(move |_| Ok(Some((dev, twin)))),
    )
    .await
    .unwrap();
    let mut attacker = method_listener(&s, "hub-b", "dev-1", &other_key).await;
    let mut device = method_listener(&s, &s.hub(), "dev-1", &key).await;

    let call = invoke(&s, "dev-1", 20);
    let rid = method_rid(&mut device).await;
    answer(&mut attacker, &rid, 200, json!({"forged": "hub-b"})).await;
    answer(&mut device, &rid, 200, json!({"real": true})).await;
    assert_eq!(call.await.unwrap(), (200, json!({"status": 200, "payload": {"real": true}})));

    // A call sent to one connection is not answered by the device's next connection either:
    // the caller learns the call is lost when the connection it went to closes.
    let call = invoke(&s, "dev-1", 20);
    let rid = method_rid(&mut device).await;
    let mut replacement = method_listener(&s, &s.hub(), "dev-1", &key).await;
    assert!(device.recv().await.is_none(), "the old connection was replaced");
    answer(&mut replacement, &rid, 200, json!({"late": true})).await;
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 504, "{body}");
}

#[tokio::test]
async fn rids_that_would_reshape_the_response_topic_close_the_connection() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    for rid in ["a%23b", "a%2Fb", "a%26%24version%3D9", "%2B", "a%25"] {
        for topic in [
            format!("$iothub/twin/GET/?$rid={rid}"),
            format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
            format!("$iothub/methods/res/200/?$rid={rid}"),
        ] {
            let mut m = s.hub_device("dev-1", &key).await.unwrap();
            m.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce, 1).await;
            m.publish(&topic, QoS::AtLeastOnce, 2, b"{}").await;
            assert!(m.recv().await.is_none(), "{topic}: closed, nothing echoed");
        }
    }
    // A wildcard in the device's own publish topic: a protocol violation.
    for topic in [
        "devices/dev-1/messages/events/#",
        "devices/dev-1/messages/events/a=+",
        "$iothub/twin/GET/?$rid=1#",
        "$iothub/methods/res/200/?$rid=+",
    ] {
        let mut m = s.hub_device("dev-1", &key).await.unwrap();
        m.publish(topic, QoS::AtLeastOnce, 2, b"{}").await;
        assert!(m.recv().await.is_none(), "{topic}");
    }
    assert!(s.stored_events().await.is_empty(), "no telemetry from a wildcard topic was stored");
    // An SDK's rid (a UUID) still round-trips.
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    m.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce, 1).await;
    let rid = "6f1d3c0e-0b4e-4b7e-9b55-0d0d5c1e2f3a";
    m.publish(&format!("$iothub/twin/GET/?$rid={rid}"), QoS::AtLeastOnce, 2, b" ").await;
    assert_eq!(m.next_publish().await.topic, format!("$iothub/twin/res/200/?$rid={rid}"));
}

#[tokio::test]
async fn dps_refuses_rids_that_would_reshape_the_response_topic() {
    let s = TestServer::start().await;
    let (key, _) = s.create_group("grp", json!({})).await;
    let reg = "dev-1";
    let device_key = key.derive_device_key(reg);
    for topic in [
        "$dps/registrations/PUT/iotdps-register/?$rid=a%23b".to_owned(),
        "$dps/registrations/PUT/iotdps-register/?$rid=a%2Fb".to_owned(),
        "$dps/registrations/PUT/iotdps-register/?$rid=a%26retry-after%3D0".to_owned(),
        "$dps/registrations/PUT/iotdps-register/?$rid=1#".to_owned(),
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=+".to_owned(),
    ] {
        let mut m = s.mqtt().await;
        m.connect(reg, &dps_username(&s.scope(), reg), Some(&device_token(&device_key, &s.scope(), reg)), true, 60)
            .await;
        m.subscribe_dps().await;
        m.publish(&topic, QoS::AtLeastOnce, 1, b" ").await;
        assert!(m.recv().await.is_none(), "{topic}: closed, nothing echoed");
    }
    // Nothing was registered by the refused requests; a proper rid still works.
    let (topic, body) = s.register(reg, &device_key, None).await;
    assert!(topic.starts_with("$dps/registrations/res/200/?$rid=r"), "{topic} {body}");
}
