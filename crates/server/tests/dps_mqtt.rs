//! DPS over MQTT, spoken byte for byte the way the official SDKs speak it.

mod common;

use common::{device_token, dps_username, TestServer};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::{build_token, sign, URI_COMPONENT};
use fleetgate_core::time::Timestamp;
use fleetgate_store::DeviceRegistry;
use percent_encoding::utf8_percent_encode;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use serde_json::json;

const REGISTER: &str = "$dps/registrations/PUT/iotdps-register/?$rid=";
const PY_BODY: &[u8] = br#"{"payload": null, "registrationId": "dev-001"}"#;

async fn connected(s: &TestServer, reg: &str, password: &str) -> common::Mqtt {
    let mut m = s.mqtt().await;
    match m.connect(reg, &dps_username(&s.scope(), reg), Some(password), false, 60).await {
        Packet::ConnAck(a) => {
            assert_eq!(a.code, ConnectReturnCode::Success);
            assert!(!a.session_present, "C# aborts on session-present");
        }
        other => panic!("{other:?}"),
    }
    m
}

#[tokio::test]
async fn python_style_registration_is_answered_with_puback_then_200_assigned() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-1", json!({})).await;
    let key = primary.derive_device_key("dev-001");
    let mut m = connected(&s, "dev-001", &device_token(&key, &s.scope(), "dev-001")).await;
    match m.subscribe_dps().await {
        Packet::SubAck(a) => assert_eq!(a.return_codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]),
        other => panic!("{other:?}"),
    }
    m.publish(&format!("{REGISTER}6f1d3c0e-0b4e"), QoS::AtLeastOnce, 7, PY_BODY).await;
    match m.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.pkid, 7),
        other => panic!("PUBACK must come before the response, got {other:?}"),
    }
    let (topic, body) = m.expect_publish().await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=6f1d3c0e-0b4e");
    assert_eq!(body["status"], "assigned");
    assert!(body["operationId"].as_str().unwrap().starts_with("5."));
    let st = &body["registrationState"];
    assert_eq!(st["registrationId"], "dev-001");
    assert_eq!(st["deviceId"], "dev-001");
    assert_eq!(st["assignedHub"], s.hub());
    assert_eq!(st["substatus"], "initialAssignment");
    assert_eq!(st["symmetricKey"]["enrollmentGroupId"], "grp-1");
    assert!(st["createdDateTimeUtc"].as_str().unwrap().ends_with('Z'));

    // The record and the hub identity exist, with keys derived from both group keys.
    let rec = s.service().get_registration("DEV-001").await.unwrap();
    assert_eq!(rec["assignedHub"], s.hub());
    let store = fleetgate_store::SqliteStore::open(&s.dir.path().join("fleetgate.db")).unwrap();
    let dev = fleetgate_store::DeviceRegistry::device(&store, &s.hub(), "dev-001").await.unwrap().unwrap();
    assert_eq!(dev.primary_key, key.to_base64());
}

#[tokio::test]
async fn polling_path_202_then_operation_status_200() {
    let s = TestServer::start_with(|c| c.immediate_assignment = false).await;
    let (_, secondary) = s.create_group("grp-1", json!({})).await;
    let key = secondary.derive_device_key("dev-2");
    let mut m = connected(&s, "dev-2", &device_token(&key, &s.scope(), "dev-2")).await;
    m.subscribe_dps().await;
    m.publish(&format!("{REGISTER}1"), QoS::AtLeastOnce, 1, b"").await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let (topic, body) = m.expect_publish().await;
    assert_eq!(topic, "$dps/registrations/res/202/?$rid=1&retry-after=2");
    assert_eq!(body["status"], "assigning");
    let op = body["operationId"].as_str().unwrap().to_owned();

    // Python percent-encodes the operation id in the topic.
    let enc = utf8_percent_encode(&op, URI_COMPONENT).to_string();
    m.publish(
        &format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={enc}"),
        QoS::AtLeastOnce,
        2,
        b" ",
    )
    .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let (topic, body) = m.expect_publish().await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=2");
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["operationId"], op.as_str());
    assert_eq!(body["registrationState"]["deviceId"], "dev-2");

    m.publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=3&operationId=nope", QoS::AtLeastOnce, 3, b" ")
        .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let (topic, body) = m.expect_publish().await;
    assert_eq!(topic, "$dps/registrations/res/404/?$rid=3");
    assert_eq!(body["errorCode"], 404203);
}

/// One SDK's style: client id, token builder, QoS, body, CleanSession, keep-alive.
type Style<'a> = (&'a str, Box<dyn Fn(&SymmetricKey) -> String + 'a>, QoS, &'a [u8], bool, u16);

#[tokio::test]
async fn node_c_java_and_csharp_token_and_body_styles_all_work() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-1", json!({})).await;
    let scope = s.scope();
    let se = (Timestamp::now().unix_seconds() + 3600).to_string();
    let enc = |v: &str| utf8_percent_encode(v, URI_COMPONENT).to_string();
    let cases: Vec<Style> = vec![
        // Node: raw sr, skn=registration before se, CleanSession 1, keepalive 180.
        (
            "node-dev",
            Box::new(|k: &SymmetricKey| {
                let sr = format!("{scope}/registrations/node-dev");
                format!("SharedAccessSignature sr={sr}&sig={}&skn=registration&se={se}", enc(&sign(k, &sr, &se)))
            }),
            QoS::AtLeastOnce,
            br#"{"registrationId":"node-dev"}"#,
            true,
            180,
        ),
        // C: lower-case escapes in sr and sig, QoS 0 publish, keep-alive 0.
        (
            "c-dev",
            Box::new(|k: &SymmetricKey| {
                let sr = enc(&format!("{scope}/registrations/c-dev")).replace("%2F", "%2f");
                let sig = enc(&sign(k, &sr, &se)).replace("%2B", "%2b").replace("%2F", "%2f").replace("%3D", "%3d");
                format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn=registration")
            }),
            QoS::AtMostOnce,
            br#"{"registrationId":"c-dev"}"#,
            true,
            0,
        ),
        // Java: raw sr, empty skn, QoS 0.
        (
            "java-dev",
            Box::new(|k: &SymmetricKey| {
                let sr = format!("{scope}/registrations/java-dev");
                format!("SharedAccessSignature sr={sr}&sig={}&se={se}&skn=", enc(&sign(k, &sr, &se)))
            }),
            QoS::AtMostOnce,
            br#"{"registrationId":"java-dev"}"#,
            false,
            230,
        ),
        // C#: empty register body.
        (
            "cs-dev",
            Box::new(|k: &SymmetricKey| {
                let sr = enc(&format!("{scope}/registrations/cs-dev"));
                format!("SharedAccessSignature sr={sr}&sig={}&se={se}&skn=registration", enc(&sign(k, &sr, &se)))
            }),
            QoS::AtLeastOnce,
            b"",
            true,
            300,
        ),
    ];
    for (reg, token, qos, body, clean, keep_alive) in cases {
        let key = primary.derive_device_key(reg);
        let mut m = s.mqtt().await;
        match m.connect(reg, &dps_username(&scope, reg), Some(&token(&key)), clean, keep_alive).await {
            Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success, "{reg}"),
            other => panic!("{other:?}"),
        }
        m.subscribe_dps().await;
        m.publish(&format!("{REGISTER}3"), qos, if qos == QoS::AtMostOnce { 0 } else { 9 }, body).await;
        if qos == QoS::AtLeastOnce {
            assert!(matches!(m.recv().await, Some(Packet::PubAck(_))), "{reg}");
        }
        let (topic, body) = m.expect_publish().await;
        assert_eq!(topic, "$dps/registrations/res/200/?$rid=3", "{reg}");
        assert_eq!(body["status"], "assigned", "{reg}: {body}");
    }
}

#[tokio::test]
async fn wrong_key_gets_401002_and_nothing_is_stored() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-1", json!({})).await;
    let cases = [
        ("dev-a", device_token(&SymmetricKey::generate(), &s.scope(), "dev-a")),
        // A key derived for another registration id.
        ("dev-b", device_token(&primary.derive_device_key("dev-c"), &s.scope(), "dev-b")),
        // The group key itself is not a device key.
        ("dev-d", device_token(&primary, &s.scope(), "dev-d")),
        // Right key, token for another device.
        ("dev-e", device_token(&primary.derive_device_key("dev-e"), &s.scope(), "dev-f")),
        // Right key, expired.
        (
            "dev-g",
            build_token(
                &primary.derive_device_key("dev-g"),
                &format!("{}/registrations/dev-g", s.scope()),
                Timestamp::now().unix_seconds() - 400,
                None,
            ),
        ),
        // Right key, wrong scope.
        ("dev-h", device_token(&primary.derive_device_key("dev-h"), "0ne00000000", "dev-h")),
        ("dev-i", "not a token".to_owned()),
    ];
    for (reg, token) in cases {
        let mut m = connected(&s, reg, &token).await;
        m.subscribe_dps().await;
        m.publish(&format!("{REGISTER}r1"), QoS::AtLeastOnce, 2, PY_BODY).await;
        assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
        let (topic, body) = m.expect_publish().await;
        assert_eq!(topic, "$dps/registrations/res/401/?$rid=r1", "{reg}");
        assert_eq!(body["errorCode"], 401002, "{reg}");
        assert!(body["trackingId"].is_string() && body["timestampUtc"].is_string());
        let e = s.service().get_registration(reg).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{reg}: no record for a refused device");
    }
}

#[tokio::test]
async fn a_client_that_keeps_failing_is_disconnected() {
    let s = TestServer::start().await;
    let mut m = connected(&s, "dev-a", "SharedAccessSignature sr=x&sig=y&se=1").await;
    for i in 0..5 {
        m.publish(&format!("{REGISTER}{i}"), QoS::AtMostOnce, 0, b"").await;
        let (topic, _) = m.expect_publish().await;
        assert!(topic.contains("/401/"));
    }
    assert!(m.recv().await.is_none(), "closed after the fifth failure");
}

#[tokio::test]
async fn invalid_registration_ids_get_400() {
    let s = TestServer::start().await;
    for reg in ["bad!id", "ends-with.", &"x".repeat(129)] {
        let mut m = connected(&s, reg, "SharedAccessSignature sr=x&sig=y&se=99999999999").await;
        m.publish(&format!("{REGISTER}1"), QoS::AtMostOnce, 0, b"").await;
        let (topic, body) = m.expect_publish().await;
        assert_eq!(topic, "$dps/registrations/res/400/?$rid=1", "{reg}");
        assert_eq!(body["errorCode"], 400005);
    }
}

#[tokio::test]
async fn disabled_group_answers_status_disabled() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-off", json!({"provisioningStatus": "disabled"})).await;
    let key = primary.derive_device_key("dev-x");
    let mut m = connected(&s, "dev-x", &device_token(&key, &s.scope(), "dev-x")).await;
    m.publish(&format!("{REGISTER}1"), QoS::AtMostOnce, 0, b"").await;
    let (topic, body) = m.expect_publish().await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=1");
    assert_eq!(body["status"], "disabled");
    assert_eq!(body["registrationState"]["status"], "disabled");
    // The attempt is recorded as disabled, with no hub: a disabled group assigns nothing.
    let record = s.service().get_registration("dev-x").await.unwrap();
    assert_eq!(record["status"], "disabled");
    assert!(record.get("assignedHub").is_none(), "{record}");
    assert!(s.store().device(&s.hub(), "dev-x").await.unwrap().is_none());
}

#[tokio::test]
async fn malformed_register_body_gets_400() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-1", json!({})).await;
    let mut m = connected(&s, "dev-1", &device_token(&primary.derive_device_key("dev-1"), &s.scope(), "dev-1")).await;
    m.publish(&format!("{REGISTER}1"), QoS::AtMostOnce, 0, b"{not json").await;
    let (topic, body) = m.expect_publish().await;
    assert_eq!(topic, "$dps/registrations/res/400/?$rid=1");
    assert_eq!(body["errorCode"], 400004);
}

#[tokio::test]
async fn protocol_violations_close_only_the_offending_connection() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-1", json!({})).await;
    let token = device_token(&primary.derive_device_key("dev-1"), &s.scope(), "dev-1");
    // A healthy device connected throughout.
    let mut healthy = connected(&s, "dev-1", &token).await;
    healthy.subscribe_dps().await;

    // Unknown topic.
    let mut m = connected(&s, "dev-1", &token).await;
    m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 1, b"x").await;
    assert!(m.recv().await.is_none());
    // Subscribing elsewhere is refused per filter.
    let mut m = connected(&s, "dev-1", &token).await;
    let mut sub = Subscribe::new("#", QoS::AtLeastOnce);
    sub.pkid = 4;
    m.send(Packet::Subscribe(sub)).await;
    match m.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.return_codes, vec![SubscribeReasonCode::Failure]),
        other => panic!("{other:?}"),
    }
    // QoS 2.
    m.publish(&format!("{REGISTER}1"), QoS::ExactlyOnce, 5, b"").await;
    assert!(m.recv().await.is_none());
    // Garbage after CONNECT.
    let mut m = connected(&s, "dev-1", &token).await;
    m.send_raw(&[0xff; 64]).await;
    assert!(m.recv().await.is_none());
    // Oversized packet (DPS messages are at most 96 KB).
    let mut m = connected(&s, "dev-1", &token).await;
    m.publish(&format!("{REGISTER}1"), QoS::AtMostOnce, 0, &vec![b' '; 200 * 1024]).await;
    assert!(m.recv().await.is_none());
    // Garbage instead of CONNECT.
    let mut m = s.mqtt().await;
    m.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(m.recv().await.is_none());
    // A CONNECT whose client id is not the registration id.
    let mut m = s.mqtt().await;
    match m.connect("someone-else", &dps_username(&s.scope(), "dev-1"), Some(&token), true, 60).await {
        Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::BadClientId),
        other => panic!("{other:?}"),
    }
    // A username that is neither DPS nor hub.
    let mut m = s.mqtt().await;
    match m.connect("dev-1", "nobody", Some("x"), true, 60).await {
        Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::BadUserNamePassword),
        other => panic!("{other:?}"),
    }
    // MQTT 5 CONNECT (protocol level 5) is refused with "unacceptable protocol version".
    let mut m = s.mqtt().await;
    m.send_raw(&[
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x03, b'a', b'b', b'c',
    ])
    .await;
    match m.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("{other:?}"),
    }

    // The healthy device is unaffected.
    healthy.publish(&format!("{REGISTER}ok"), QoS::AtLeastOnce, 3, PY_BODY).await;
    assert!(matches!(healthy.recv().await, Some(Packet::PubAck(_))));
    let (topic, body) = healthy.expect_publish().await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=ok");
    assert_eq!(body["status"], "assigned");
}

#[tokio::test]
async fn stalled_clients_are_dropped_at_the_handshake_deadline() {
    let s = TestServer::start().await;
    // TCP connect, then silence: no TLS ClientHello.
    let mut tcp = tokio::net::TcpStream::connect(s.mqtt_addr()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut tcp, &mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "server closed the stalled connection");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // TLS done, but no CONNECT.
    let mut m = s.mqtt().await;
    assert!(m.recv().await.is_none());
}

#[tokio::test]
async fn registering_again_returns_the_same_assignment() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-1", json!({})).await;
    let key = primary.derive_device_key("Dev-Case");
    let mut first = None;
    for rid in ["a", "b"] {
        let mut m = connected(&s, "Dev-Case", &device_token(&key, &s.scope(), "Dev-Case")).await;
        m.publish(&format!("{REGISTER}{rid}"), QoS::AtMostOnce, 0, b"").await;
        let (_, body) = m.expect_publish().await;
        let st = body["registrationState"].clone();
        assert_eq!(st["status"], "assigned");
        if let Some(f) = &first {
            let f: &serde_json::Value = f;
            assert_eq!(st["assignedHub"], f["assignedHub"]);
            assert_eq!(st["deviceId"], f["deviceId"]);
            assert_eq!(st["createdDateTimeUtc"], f["createdDateTimeUtc"]);
            assert_ne!(st["etag"], f["etag"]);
        }
        first = Some(st);
    }
    // Lookup is case-insensitive; the device id keeps the device's spelling.
    let rec = s.service().get_registration("dev-case").await.unwrap();
    assert_eq!(rec["deviceId"], "Dev-Case");
    let recs = s.service().list_registrations("GRP-1").await.unwrap();
    assert_eq!(recs.len(), 1);
}
