//! Issue 14, items 10, 11 and 15–18: direct methods and MQTT details as Azure documents them
//! (`connectTimeoutInSeconds`, method names and the 128 KB answer; Will, RETAIN, the connection
//! annotations and properties without a value), spoken as raw MQTT and HTTP.

mod common;

use std::time::Duration;

use common::{Mqtt, TestServer};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, LastWill, Login, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};

const V: &str = "?api-version=2021-04-12";

/// `POST /twins/{device}/methods` with `body`: status and JSON answer.
async fn call(s: &TestServer, device: &str, body: Value) -> (u16, Value) {
    let resp = s
        .http()
        .post(s.url(&format!("/twins/{device}/methods{V}")))
        .header("Authorization", s.hub_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// The same call, run in the background.
fn spawn_call(s: &TestServer, device: &str, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
    let (http, url, token) = (s.http(), s.url(&format!("/twins/{device}/methods{V}")), s.hub_token());
    tokio::spawn(async move {
        let r = http.post(url).header("Authorization", token).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    })
}

/// Answers the next method call with `status` and `body`; returns the call's method name.
async fn answer(m: &mut Mqtt, status: u16, body: &[u8]) -> String {
    let p = m.next_publish().await;
    let (name, rid) = p
        .topic
        .strip_prefix("$iothub/methods/POST/")
        .and_then(|t| t.split_once("/?$rid="))
        .expect("a method request topic");
    let name = name.to_owned();
    m.publish(&format!("$iothub/methods/res/{status}/?$rid={rid}"), QoS::AtMostOnce, 0, body).await;
    name
}

#[tokio::test]
async fn connect_timeout_waits_for_the_device_to_connect_and_subscribe() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    let reboot = |connect: Value| json!({"methodName": "reboot", "responseTimeoutInSeconds": 10, "connectTimeoutInSeconds": connect});
    // Out of Azure's range 0..=300: refused.
    for bad in [json!(301), json!(-1), json!("soon")] {
        assert_eq!(call(&s, "dev-1", reboot(bad.clone())).await.0, 400, "{bad}");
    }
    // 0 (and absent): the device must be online now.
    assert_eq!(call(&s, "dev-1", reboot(json!(0))).await.1["errorCode"], 404103);
    // Nobody connects within the wait: 404103 once it is over, not before.
    let started = std::time::Instant::now();
    assert_eq!(call(&s, "dev-1", reboot(json!(1))).await.1["errorCode"], 404103);
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());

    // A call to a device that connects and subscribes while it waits is delivered.
    let mut waiting = spawn_call(&s, "dev-1", reboot(json!(60)));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut waiting).await.is_err(),
        "the call waits for the device instead of failing at once"
    );
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    // Connected but not listening for methods: still waiting.
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
    assert!(!waiting.is_finished());
    m.subscribe("$iothub/methods/POST/#", QoS::AtMostOnce, 1).await;
    assert_eq!(answer(&mut m, 200, br#"{"rebooting":true}"#).await, "reboot");
    let (status, body) = waiting.await.unwrap();
    assert_eq!((status, body), (200, json!({"status": 200, "payload": {"rebooting": true}})));

    // A persistent session's restored subscription counts too (the SDKs do not subscribe again).
    drop(m);
    s.wait_disconnected("dev-1").await;
    let mut waiting = spawn_call(&s, "dev-1", reboot(json!(60)));
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut waiting).await.is_err());
    let (mut m, present) = s.hub_device_session("dev-1", &key, false).await.unwrap();
    assert!(present, "CleanSession 0: the methods subscription is restored");
    assert_eq!(answer(&mut m, 201, b"").await, "reboot");
    assert_eq!(waiting.await.unwrap(), (200, json!({"status": 201, "payload": null})));
}

#[tokio::test]
async fn method_names_azure_forbids_are_refused_and_large_answers_fail_the_call() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    m.subscribe("$iothub/methods/POST/#", QoS::AtMostOnce, 1).await;
    for name in ["re/boot", "a b", "$x", "a\tb", "f(x)", "k=v", "{}", "caf\u{e9}", "q?"] {
        let (status, body) = call(&s, "dev-1", json!({"methodName": name, "responseTimeoutInSeconds": 5})).await;
        assert_eq!((status, body["errorCode"].as_u64()), (400, Some(400004)), "{name:?}: {body}");
    }
    // Allowed punctuation is delivered as it is.
    let waiting = spawn_call(&s, "dev-1", json!({"methodName": "get-Status_v2.1", "responseTimeoutInSeconds": 10}));
    assert_eq!(answer(&mut m, 200, b"{}").await, "get-Status_v2.1");
    assert_eq!(waiting.await.unwrap().0, 200);

    // An answer up to 128 KB reaches the caller; a larger one fails the call (413).
    let fits = serde_json::to_vec(&"x".repeat(128 * 1024 - 2)).unwrap();
    assert_eq!(fits.len(), 128 * 1024);
    let waiting = spawn_call(&s, "dev-1", json!({"methodName": "dump", "responseTimeoutInSeconds": 10}));
    answer(&mut m, 200, &fits).await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!((status, body["payload"].as_str().map(str::len)), (200, Some(128 * 1024 - 2)));
    let too_large = serde_json::to_vec(&"x".repeat(128 * 1024 - 1)).unwrap();
    let waiting = spawn_call(&s, "dev-1", json!({"methodName": "dump", "responseTimeoutInSeconds": 30}));
    let started = std::time::Instant::now();
    answer(&mut m, 200, &too_large).await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!((status, body["errorCode"].as_u64()), (413, Some(413001)));
    assert!(started.elapsed() < Duration::from_secs(20), "failed at once, not at the timeout");
}

/// A hub CONNECT for `id` with `will`; CONNACK checked.
async fn connect_with_will(s: &TestServer, id: &str, key: &SymmetricKey, will: LastWill) -> Mqtt {
    let hub = s.hub();
    let token = build_token(key, &format!("{hub}/devices/{id}"), Timestamp::now().unix_seconds() + 3600, None);
    let mut m = s.mqtt().await;
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c.login = Some(Login::new(format!("{hub}/{id}/?api-version=2021-04-12"), token));
    c.last_will = Some(will);
    m.send(Packet::Connect(c)).await;
    match m.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("{other:?}"),
    }
    m
}

#[tokio::test]
async fn a_will_is_forwarded_only_when_the_connection_drops() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    let will = |topic: &str| LastWill::new(topic, br#"{"alive":false}"#.to_vec(), QoS::AtLeastOnce, false);

    // A clean DISCONNECT discards the Will.
    let mut m = connect_with_will(&s, "dev-1", &key, will("devices/dev-1/messages/events/")).await;
    m.send(Packet::Disconnect).await;
    assert!(m.recv().await.is_none());
    s.wait_disconnected("dev-1").await;
    assert!(s.stored_events().await.is_empty(), "no Will after DISCONNECT");

    // A Will on any other topic is ignored (the connection is still accepted).
    for topic in ["status/dev-1", "devices/dev-2/messages/events/", "$iothub/twin/GET/?$rid=1"] {
        let m = connect_with_will(&s, "dev-1", &key, will(topic)).await;
        drop(m);
        s.wait_disconnected("dev-1").await;
    }
    assert!(s.stored_events().await.is_empty(), "no Will from another topic");

    // Dropped without DISCONNECT: the Will is telemetry, marked `iothub-MessageType=Will`, with
    // the bag of its topic (and `mqtt-retain` when the Will had RETAIN).
    let m =
        connect_with_will(&s, "dev-1", &key, will("devices/dev-1/messages/events/%24.ct=application%2Fjson&k=v")).await;
    drop(m);
    s.wait_disconnected("dev-1").await;
    let mut retained = will("devices/dev-1/messages/events/");
    retained.retain = true;
    let m = connect_with_will(&s, "dev-1", &key, retained).await;
    drop(m);
    s.wait_disconnected("dev-1").await;
    let events = s.stored_events().await;
    assert_eq!(events.len(), 2, "{events:?}");
    let e = &events[0]["event"];
    assert_eq!(e["origin"], "dev-1");
    assert_eq!(e["payload"], json!({"alive": false}));
    assert_eq!(e["properties"]["application"], json!({"iothub-MessageType": "Will", "k": "v"}));
    assert_eq!(e["properties"]["system"]["content-type"], "application/json");
    assert_eq!(
        events[1]["event"]["properties"]["application"],
        json!({"iothub-MessageType": "Will", "mqtt-retain": "true"})
    );
}

#[tokio::test]
async fn retain_auth_annotations_and_null_properties_reach_the_event() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    let mut retained = Publish::new("devices/dev-1/messages/events/a=1", QoS::AtLeastOnce, b"r".to_vec());
    retained.retain = true;
    retained.pkid = 1;
    m.send(Packet::Publish(retained)).await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    m.publish("devices/dev-1/messages/events/flag&empty=&x=1", QoS::AtLeastOnce, 2, b"n").await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));

    let events = s.stored_events().await;
    assert_eq!(events.len(), 2);
    // RETAIN=1: IoT Hub keeps nothing and adds `mqtt-retain`.
    assert_eq!(events[0]["event"]["properties"]["application"], json!({"a": "1", "mqtt-retain": "true"}));
    // `flag` (no `=`) is null, `empty=` the empty string.
    assert_eq!(events[1]["event"]["properties"]["application"], json!({"flag": null, "empty": "", "x": "1"}));
    // Every event says how its sender authenticated and which generation of the identity it was.
    let generation = s.hub_get("/devices/dev-1").await["generationId"].as_str().unwrap().to_owned();
    for e in &events {
        let a = &e["event"]["annotations"];
        assert_eq!(
            a["iothub-connection-auth-method"],
            r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
        );
        assert_eq!(a["iothub-connection-auth-generation-id"], generation.as_str());
    }
}
