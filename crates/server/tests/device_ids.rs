//! Issue 13 item 4: hub device ids are case-sensitive, as in IoT Hub, and an id equal to a word of
//! the service API's routes is an id like any other.

mod common;

use common::TestServer;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;

const V: &str = "?api-version=2021-04-12";

/// Ids that differ only in case, and ids equal to route words in any case.
const IDS: &[&str] = &["Events", "events", "EVENTS", "Messages", "DeviceBound", "Methods", "Twins", "Statistics"];

/// `POST /devices/{id}/messages/devicebound`; the status.
async fn send_c2d(s: &TestServer, id: &str, body: &'static str) -> u16 {
    let resp = s
        .http()
        .post(s.url(&format!("/devices/{id}/messages/devicebound{V}")))
        .header("Authorization", s.hub_token())
        .body(body)
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

#[tokio::test]
async fn ids_differing_in_case_are_distinct_devices_and_route_words_keep_their_case() {
    let s = TestServer::start().await;
    let mut keys = Vec::new();
    for id in IDS {
        keys.push(s.create_device(id).await);
    }
    let listed = s.hub_get("/devices").await;
    let mut listed: Vec<&str> = listed.as_array().unwrap().iter().map(|d| d["deviceId"].as_str().unwrap()).collect();
    listed.sort_unstable();
    let mut expected = IDS.to_vec();
    expected.sort_unstable();
    assert_eq!(listed, expected, "one device per id");
    for (id, key) in IDS.iter().zip(&keys) {
        let device = s.hub_get(&format!("/devices/{id}")).await;
        assert_eq!(device["deviceId"], *id, "{device}");
        assert_eq!(device["authentication"]["symmetricKey"]["primaryKey"], key.to_base64(), "{id}: its own identity");
        assert_eq!(s.hub_get(&format!("/twins/{id}")).await["deviceId"], *id);
    }
    // A cloud-to-device message to `Messages` (the route word in the id's position) is its own.
    assert_eq!(send_c2d(&s, "Messages", "for Messages").await, 204);
    // Deleting `events` leaves `Events` and `EVENTS`.
    let resp = s
        .http()
        .delete(s.url(&format!("/devices/events{V}")))
        .header("Authorization", s.hub_token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(s.hub_get("/devices/Events").await["deviceId"], "Events");
    assert_eq!(s.hub_get("/devices/EVENTS").await["deviceId"], "EVENTS");
    let gone: Value = s.hub_get("/devices/events").await;
    assert_eq!(gone["errorCode"], 404001, "{gone}");
}

#[tokio::test]
async fn a_device_connects_sends_and_receives_only_as_the_id_it_was_created_with() {
    let s = TestServer::start().await;
    let upper = s.create_device("Dev-Case").await;
    let lower = s.create_device("dev-case").await;
    // Each key opens only its own device; an id in another case is no device at all.
    assert_eq!(s.hub_device("dev-case", &upper).await.err(), Some(ConnectReturnCode::NotAuthorized));
    assert_eq!(s.hub_device("DEV-CASE", &upper).await.err(), Some(ConnectReturnCode::NotAuthorized));
    let mut m_upper = s.hub_device("Dev-Case", &upper).await.unwrap();
    let mut m_lower = s.hub_device("dev-case", &lower).await.unwrap();
    m_upper.subscribe("devices/Dev-Case/messages/devicebound/#", QoS::AtLeastOnce, 1).await;
    m_lower.subscribe("devices/dev-case/messages/devicebound/#", QoS::AtLeastOnce, 1).await;
    m_upper.publish("devices/Dev-Case/messages/events/", QoS::AtLeastOnce, 2, b"from upper").await;
    assert!(matches!(m_upper.recv().await, Some(Packet::PubAck(_))));
    let events = s.stored_events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"]["origin"], "Dev-Case");
    // Both are connected, each on its own session.
    for id in ["Dev-Case", "dev-case"] {
        assert_eq!(s.hub_get(&format!("/devices/{id}")).await["connectionState"], "Connected", "{id}");
    }
    assert_eq!(send_c2d(&s, "dev-case", "for lower").await, 204);
    let p = m_lower.next_publish().await;
    assert!(p.topic.starts_with("devices/dev-case/messages/devicebound/"), "{}", p.topic);
    assert_eq!(&p.payload[..], b"for lower");
    // Nothing reached Dev-Case: its next packet is the answer to a ping.
    m_upper.send(Packet::PingReq).await;
    assert!(matches!(m_upper.recv().await, Some(Packet::PingResp)), "Dev-Case got nothing");
}

/// Issue 14 item 1: a device id with every symbol IoT Hub allows (`- . % _ * ? ! ( ) , : = @ $ '`)
/// is created, read and deleted through the REST API with the id percent-encoded in the path,
/// connects over MQTT with the id unencoded in the username and in topics (as IoT Hub and the
/// Python SDK 2.14 have it; the percent-encoded topic of older SDKs works too), and receives C2D
/// on the unencoded topic; ids outside the rule are refused with 400005. The DPS rules (no `$`,
/// no trailing `.`) do not apply here.
#[tokio::test]
async fn device_ids_with_every_symbol_azure_allows_work_over_rest_and_mqtt() {
    use fleetgate_core::keys::SymmetricKey;
    use percent_encoding::utf8_percent_encode;
    let enc = |id: &str| utf8_percent_encode(id, fleetgate_core::sas::URI_COMPONENT).to_string();
    let s = TestServer::start().await;
    let put = |id: &str, key: &SymmetricKey| {
        let body = serde_json::json!({"deviceId": id, "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key.to_base64()}}});
        s.http()
            .put(s.url(&format!("/devices/{}{V}", enc(id))))
            .header("Authorization", s.hub_token())
            .json(&body)
            .send()
    };
    for id in ["a-b.c%d_e*f?g!h(i)j,k:l=m@n$o'p", "dev.", "$edgeAgent-like", "100%"] {
        let key = SymmetricKey::generate();
        let resp = put(id, &key).await.unwrap();
        assert_eq!(resp.status(), 200, "{id}: {}", resp.text().await.unwrap());
        let device = s.hub_get(&format!("/devices/{}", enc(id))).await;
        assert_eq!(device["deviceId"], id, "{device}");
        assert_eq!(s.hub_get(&format!("/twins/{}", enc(id))).await["deviceId"], id);

        let mut m = s.hub_device(id, &key).await.unwrap_or_else(|e| panic!("{id}: {e:?}"));
        m.subscribe(&format!("devices/{id}/messages/devicebound/#"), QoS::AtLeastOnce, 1).await;
        m.publish(&format!("devices/{id}/messages/events/"), QoS::AtLeastOnce, 2, b"hi").await;
        assert!(matches!(m.recv().await, Some(Packet::PubAck(_))), "{id}: telemetry accepted");
        m.publish(&format!("devices/{}/messages/events/", enc(id)), QoS::AtLeastOnce, 3, b"encoded").await;
        assert!(matches!(m.recv().await, Some(Packet::PubAck(_))), "{id}: percent-encoded topic accepted");
        let resp = s
            .http()
            .post(s.url(&format!("/devices/{}/messages/devicebound{V}", enc(id))))
            .header("Authorization", s.hub_token())
            .body("to you")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        let p = m.next_publish().await;
        assert!(p.topic.starts_with(&format!("devices/{id}/messages/devicebound/")), "{id}: {}", p.topic);
        assert_eq!(&p.payload[..], b"to you");
    }
    let origins: Vec<Value> = s.stored_events().await.iter().map(|e| e["event"]["origin"].clone()).collect();
    assert_eq!(origins[0], "a-b.c%d_e*f?g!h(i)j,k:l=m@n$o'p");
    for bad in ["a b", "a#b", "a+b", "a&b", "dév", "a\\b", &"x".repeat(129)] {
        let resp = put(bad, &SymmetricKey::generate()).await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        assert_eq!(resp.json::<Value>().await.unwrap()["errorCode"], 400005, "{bad}");
    }
    let resp = s
        .http()
        .delete(s.url(&format!("/devices/{}{V}", enc("100%"))))
        .header("Authorization", s.hub_token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(s.hub_get(&format!("/devices/{}", enc("100%"))).await["errorCode"], 404001);
}
