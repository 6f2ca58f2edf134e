//! Azure-like throttling: over the quota the device is told to come back (DPS 429, hub CONNACK
//! 3) or slowed down (hub telemetry), and admitted work is unaffected.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use fleetgate_core::throttle::Rate;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;
use serde_json::json;

#[tokio::test]
async fn registrations_over_the_scope_quota_get_429_with_retry_after() {
    let s = TestServer::start_with(|c| c.registration_rate = Some(Rate { per_second: 2.0, burst: 2.0 })).await;
    let (primary, _) = s.create_group("grp", json!({})).await;
    let mut throttled = 0;
    for i in 0..5 {
        let reg = format!("dev-{i}");
        let (topic, body) = s.register(&reg, &primary.derive_device_key(&reg), None).await;
        if topic.contains("/429/") {
            throttled += 1;
            assert!(topic.contains("&retry-after="), "{topic}");
            assert_eq!(body["errorCode"], 429001);
            assert!(s.service().get_registration(&reg).await.is_err(), "a throttled device got nothing");
        } else {
            assert_eq!(body["status"], "assigned");
        }
    }
    assert!(throttled >= 2, "the burst of 2 admits two, then most are refused ({throttled})");
    // After waiting as told, a device gets in. Time must pass: the quota refills at 2 a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, body) = s.register("dev-late", &primary.derive_device_key("dev-late"), None).await;
    assert_eq!(body["status"], "assigned");
}

/// `retry-after` on a throttled registration is the real wait until the quota frees a slot
/// (whole seconds, rounded up), over MQTT (in the response topic) and HTTPS (the header): at
/// 6 a minute with a burst of 1, the second registration waits about 10 s, not a fixed 2.
#[tokio::test]
async fn throttled_registrations_are_told_the_real_wait() {
    let s = TestServer::start_with(|c| c.registration_rate = Some(Rate { per_second: 0.1, burst: 1.0 })).await;
    let (primary, _) = s.create_group("grp", json!({})).await;
    let (_, body) = s.register("first", &primary.derive_device_key("first"), None).await;
    assert_eq!(body["status"], "assigned");

    let (topic, body) = s.register("dev-mqtt", &primary.derive_device_key("dev-mqtt"), None).await;
    assert_eq!(body["errorCode"], 429001, "{topic}");
    let secs: u32 = topic.split("&retry-after=").nth(1).expect("a retry-after").parse().unwrap();
    // 10 s minus the moments since the first registration, rounded up.
    assert!((9..=10).contains(&secs), "{topic}");

    let reg = "dev-https";
    let url = s.url(&format!("/{}/registrations/{reg}/register?api-version=2021-06-01", s.scope()));
    let token = common::device_token(&primary.derive_device_key(reg), &s.scope(), reg);
    let resp = s.http().put(&url).header("authorization", &token).json(&json!({"registrationId": reg})).send().await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 429);
    let secs: u32 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((9..=10).contains(&secs), "{secs}");
}

#[tokio::test]
async fn hub_connects_over_the_quota_get_server_unavailable() {
    let s = TestServer::start_with(|c| c.hub.connect_rate = Some(Rate { per_second: 1.0, burst: 1.0 })).await;
    let key = s.create_device("dev-1").await;
    let first = s.hub_device("dev-1", &key).await;
    assert!(first.is_ok());
    assert_eq!(s.hub_device("dev-1", &key).await.err(), Some(ConnectReturnCode::ServiceUnavailable));
    // Time must pass: the quota refills one connect a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(s.hub_device("dev-1", &key).await.is_ok(), "admitted again once the quota refills");
}

/// Refused CONNECTs (a wrong key, a made-up hub name) do not spend the hub's connect quota: a
/// stranger must not keep every device of the hub out with a few refused attempts per second.
#[tokio::test]
async fn refused_hub_connects_do_not_spend_the_quota() {
    let s = TestServer::start_with(|c| c.hub.connect_rate = Some(Rate { per_second: 0.01, burst: 1.0 })).await;
    let key = s.create_device("dev-1").await;
    let wrong = fleetgate_core::keys::SymmetricKey::generate();
    for _ in 0..3 {
        assert_eq!(s.hub_device("dev-1", &wrong).await.err(), Some(ConnectReturnCode::NotAuthorized));
        let mut m = s.mqtt().await;
        let user = "no-such-hub.example.net/dev-1/?api-version=2019-10-01";
        match m.connect("dev-1", user, Some("SharedAccessSignature sr=x&sig=y&se=1"), true, 60).await {
            Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
            other => panic!("{other:?}"),
        }
    }
    // The quota's one connect (it refills in 100 s) is still there for the device.
    assert!(s.hub_device("dev-1", &key).await.is_ok(), "the refused attempts spent the quota");
    assert_eq!(s.hub_device("dev-1", &key).await.err(), Some(ConnectReturnCode::ServiceUnavailable));
}

#[tokio::test]
async fn hub_telemetry_over_the_quota_is_slowed_not_lost() {
    let s = TestServer::start_with(|c| c.hub.message_rate = Some(Rate { per_second: 10.0, burst: 5.0 })).await;
    let key = s.create_device("dev-1").await;
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    let started = Instant::now();
    for i in 1..=20u16 {
        m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, i, format!("m{i}").as_bytes()).await;
        assert!(matches!(m.recv().await, Some(Packet::PubAck(a)) if a.pkid == i));
    }
    // 5 from the burst, 15 more at 10/s: at least 1.4 s of shaping (a lower bound, not a speed test).
    assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
    assert_eq!(s.stored_events().await.len(), 20);
}

#[tokio::test]
async fn a_throttled_device_keeps_its_dps_session() {
    // One registration admitted, then every request is over the quota: more 429s than the
    // failed-request limit, which counts refused credentials only.
    let s = TestServer::start_with(|c| c.registration_rate = Some(Rate { per_second: 0.001, burst: 1.0 })).await;
    let (primary, _) = s.create_group("grp", json!({})).await;
    let (_, body) = s.register("first", &primary.derive_device_key("first"), None).await;
    assert_eq!(body["status"], "assigned");
    let reg = "dev-throttled";
    let key = primary.derive_device_key(reg);
    let mut m = s.mqtt().await;
    m.connect(
        reg,
        &common::dps_username(&s.scope(), reg),
        Some(&common::device_token(&key, &s.scope(), reg)),
        true,
        60,
    )
    .await;
    m.subscribe_dps().await;
    let body = json!({"registrationId": reg}).to_string();
    for i in 0..8 {
        m.publish(&format!("$dps/registrations/PUT/iotdps-register/?$rid=r{i}"), QoS::AtMostOnce, 0, body.as_bytes())
            .await;
        let (topic, _) = m.expect_publish().await;
        assert!(topic.starts_with("$dps/registrations/res/429/"), "{topic}");
    }
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)), "the throttled device's session was closed");
}
