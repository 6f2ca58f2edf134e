//! The device client against a real Fleetgate server on loopback (port 0, temp data dir).

mod common;

use std::time::Duration;

use common::Server;
use fleetgate_client::{register, Error, SymmetricKey, TelemetryEvent};
use serde_json::json;

#[tokio::test]
async fn registers_and_is_assigned_at_once() {
    let s = Server::start(true).await;
    let group_key = s.group("grp-1", json!({})).await;
    let mut o = s.options("dev-001", group_key.derive_device_key("dev-001"));
    o.payload = Some(json!({"modelId": "dtmi:example;1"}));
    let r = register(&o).await.unwrap();
    assert_eq!(r.status, "assigned");
    assert_eq!(r.assigned_hub, s.running.instance.hubs[0].host_name);
    assert_eq!(r.device_id, "dev-001");
    assert_eq!(r.registration_id, "dev-001");
    assert_eq!(r.substatus.as_deref(), Some("initialAssignment"));
    assert!(!r.operation_id.is_empty());
    assert_eq!(r.registration_state.extra["symmetricKey"]["enrollmentGroupId"], "grp-1");

    // The service keeps the record; registering again keeps the device id and creation time.
    let rec = s.service().get_registration("dev-001").await.unwrap();
    assert_eq!(rec.assigned_hub.as_deref(), Some(r.assigned_hub.as_str()));
    assert_eq!(rec.status, "assigned");
    // Connecting by the certificate's own name works too.
    o.host = "localhost".into();
    o.server_name = None;
    let again = register(&o).await.unwrap();
    assert_eq!(again.device_id, "dev-001");
    assert_eq!(again.created_date_time_utc, r.created_date_time_utc);
}

#[tokio::test]
async fn follows_202_and_polls_the_operation_status() {
    let s = Server::start(false).await;
    let group_key = s.group("grp-poll", json!({})).await;
    let started = std::time::Instant::now();
    let r = register(&s.options("dev-poll", group_key.derive_device_key("dev-poll"))).await.unwrap();
    assert_eq!(r.status, "assigned");
    assert_eq!(r.device_id, "dev-poll");
    assert_eq!(r.assigned_hub, s.running.instance.hubs[0].host_name);
    assert!(started.elapsed() >= Duration::from_secs(1), "waited for retry-after before polling");
}

#[tokio::test]
async fn wrong_key_is_a_401002_unauthorized() {
    let s = Server::start(true).await;
    s.group("grp-1", json!({})).await;
    let wrong = SymmetricKey::generate().derive_device_key("dev-x");
    let e = register(&s.options("dev-x", wrong)).await.unwrap_err();
    assert!(matches!(&e, Error::Unauthorized(a) if a.status == 401 && a.error_code == Some(401002)), "{e:?}");
    assert!(!e.is_retryable());
    assert!(e.reason().starts_with("401002 "), "{}", e.reason());
}

#[tokio::test]
async fn invalid_registration_id_is_a_400() {
    let s = Server::start(true).await;
    let group_key = s.group("grp-1", json!({})).await;
    let e = register(&s.options("bad!id", group_key.derive_device_key("bad!id"))).await.unwrap_err();
    assert!(matches!(&e, Error::Api(a) if a.status == 400), "{e:?}");
}

#[tokio::test]
async fn disabled_group_is_a_failed_registration() {
    let s = Server::start(true).await;
    let group_key = s.group("grp-off", json!({"provisioningStatus": "disabled"})).await;
    let e = register(&s.options("dev-off", group_key.derive_device_key("dev-off"))).await.unwrap_err();
    match e {
        Error::RegistrationFailed { status, registration_state } => {
            assert_eq!(status, "disabled");
            assert_eq!(registration_state.status, "disabled");
            assert_eq!(registration_state.registration_id, "dev-off");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn untrusted_server_and_unreachable_port_fail_cleanly() {
    let s = Server::start(true).await;
    let group_key = s.group("grp-1", json!({})).await;
    // A different CA: the handshake must fail.
    let other = tempfile::tempdir().unwrap();
    let other_server = fleetgate_server::start(common::config(other.path())).await.unwrap();
    let mut o = s.options("dev-1", group_key.derive_device_key("dev-1"));
    o.ca_pem = std::fs::read(other.path().join("ca.pem")).unwrap();
    let e = register(&o).await.unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    // The name the certificate must carry is checked.
    let mut o = s.options("dev-1", group_key.derive_device_key("dev-1"));
    o.server_name = Some("elsewhere.example".into());
    let e = register(&o).await.unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    other_server.shutdown().await;
    // Nothing listening.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut o = s.options("dev-1", group_key.derive_device_key("dev-1"));
    o.port = closed_port;
    let e = register(&o).await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(e.is_retryable());
    // Not a PEM at all.
    let mut o = s.options("dev-1", group_key.derive_device_key("dev-1"));
    o.ca_pem = b"nothing".to_vec();
    assert!(matches!(register(&o).await.unwrap_err(), Error::Tls { .. }));
}

#[tokio::test]
async fn provisioned_device_sends_telemetry_and_receives_c2d() {
    use fleetgate_client::{C2dOptions, HubClient, HubOptions, Properties};

    let s = Server::start(true).await;
    let group_key = s.group("grp-hub", json!({})).await;
    let key = group_key.derive_device_key("dev-hub");
    let r = register(&s.options("dev-hub", key.clone())).await.unwrap();

    let mut o = HubOptions::new("127.0.0.1", s.ca_pem(), &r.assigned_hub, &r.device_id, key.clone());
    o.port = s.running.mqtt_addr.port();
    o.server_name = Some("localhost".into());
    o.timeout = Duration::from_secs(20);
    let hub = HubClient::connect(&o).await.unwrap();

    // Concurrent sends each resolve on their own PUBACK.
    let hub = std::sync::Arc::new(hub);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..5 {
        let hub = hub.clone();
        sends.spawn(async move {
            let mut p = Properties::default();
            p.system.insert("message-id".into(), format!("m {i}"));
            p.system.insert("content-type".into(), "application/json".into());
            p.application.insert("temp alert".into(), "a/b&c".into());
            hub.send_telemetry(format!("{{\"n\":{i}}}").into_bytes(), &p).await
        });
    }
    while let Some(r) = sends.join_next().await {
        r.unwrap().unwrap();
    }
    let hub = std::sync::Arc::try_unwrap(hub).ok().unwrap();
    let mut events: Vec<TelemetryEvent> = Vec::new();
    s.hub_service()
        .monitor_events(Some(0), Some("dev-hub"), Some(Duration::from_secs(10)), |e| {
            events.push(e);
            events.len() < 5
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 5, "{events:?}");
    let e = &events[0].event;
    assert_eq!(e.origin, "dev-hub");
    assert_eq!(e.properties.application["temp alert"], "a/b&c");
    assert_eq!(e.properties.system["content-type"], "application/json");
    let mut ns: Vec<i64> = events.iter().map(|e| e.event.payload["n"].as_i64().unwrap()).collect();
    ns.sort();
    assert_eq!(ns, vec![0, 1, 2, 3, 4]);

    // Cloud-to-device.
    let mut c2d = hub.subscribe_c2d().await.unwrap();
    let o2 = C2dOptions {
        message_id: Some("c2d 1".into()),
        properties: vec![("priority".into(), "high".into())],
        ..Default::default()
    };
    s.hub_service().send_c2d("dev-hub", b"hello device".to_vec(), &o2).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), c2d.recv()).await.unwrap().unwrap();
    assert_eq!(m.body, b"hello device");
    assert_eq!(m.properties.system["message-id"], "c2d 1");
    assert_eq!(m.properties.application["priority"], "high");
    hub.disconnect().await.unwrap();

    // A wrong key is refused at CONNECT.
    o.device_key = SymmetricKey::generate();
    match HubClient::connect(&o).await {
        Err(Error::Unauthorized(a)) => assert_eq!(a.status, 401),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("connected with a wrong key"),
    }
}
