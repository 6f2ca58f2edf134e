//! X.509 attestation over the wire: devices present a client certificate chain in the TLS
//! handshake and no password. DPS assigns them through an X.509 enrollment group (chain to its
//! CA) or an individual enrollment (pinned certificate); the hub then accepts the same
//! certificate. Every refusal is DPS's 401/401002 (CONNACK 5 at the hub) and stores nothing.

mod common;

use common::{dps_username, Mqtt, TestServer};
use fleetgate_testkit::pki::{
    chain_pem, device, intermediate, issue, params, root, self_signed, self_signed_device, Issued,
};
use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Certificates

fn chain(certs: &[&Issued]) -> String {
    chain_pem(certs)
}

// ---------------------------------------------------------------------------------------------
// Enrollments and device conversations

async fn x509_group(s: &TestServer, id: &str, ca: &Issued) -> Value {
    let g = json!({"enrollmentGroupId": id, "attestation": {"type": "x509", "x509": {
        "signingCertificates": {"primary": {"certificate": ca.pem()}}}}});
    s.service().put_enrollment_group(&g, None).await.unwrap()
}

async fn x509_enrollment(s: &TestServer, reg: &str, cert: &Issued, status: &str) -> Value {
    let e = json!({"registrationId": reg, "provisioningStatus": status, "attestation": {"type": "x509", "x509": {
        "clientCertificates": {"primary": {"certificate": cert.pem()}}}}});
    s.service().put_enrollment(&e, None).await.unwrap()
}

/// Registers `reg` over DPS MQTT with a client certificate and no password; returns the
/// response topic and body.
async fn register_with(s: &TestServer, reg: &str, chain_pem: &str, key: &KeyPair) -> (String, Value) {
    let mut m = s.mqtt_with_cert(chain_pem, &key.serialize_pem()).await;
    register_on(&mut m, s, reg).await
}

async fn register_on(m: &mut Mqtt, s: &TestServer, reg: &str) -> (String, Value) {
    match m.connect(reg, &dps_username(&s.scope(), reg), None, true, 60).await {
        Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("{other:?}"),
    }
    m.subscribe_dps().await;
    let body = json!({"payload": null, "registrationId": reg}).to_string();
    m.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtLeastOnce, 1, body.as_bytes()).await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    m.expect_publish().await
}

/// A refused registration: 401 with errorCode 401002, and nothing stored for the device.
async fn assert_refused(s: &TestServer, reg: &str, (topic, body): (String, Value)) {
    assert!(topic.starts_with("$dps/registrations/res/401/?$rid=1"), "{topic} {body}");
    assert_eq!(body["errorCode"], 401002, "{body}");
    let err = s.service().get_registration(reg).await.unwrap_err();
    assert!(fleetgate_client::service::is_not_found(&err), "{err:?}");
    let store = s.store();
    assert!(fleetgate_store::DeviceRegistry::device(&store, &s.hub(), reg).await.unwrap().is_none());
}

/// Connects to the hub as `id` with a client certificate and no password.
async fn hub_connect(s: &TestServer, id: &str, chain_pem: &str, key: &KeyPair) -> Result<Mqtt, ConnectReturnCode> {
    let mut m = s.mqtt_with_cert(chain_pem, &key.serialize_pem()).await;
    let user = format!("{}/{id}/?api-version=2019-10-01&DeviceClientType=test", s.hub());
    match m.connect(id, &user, None, false, 60).await {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(m),
        Packet::ConnAck(a) => Err(a.code),
        other => panic!("{other:?}"),
    }
}

async fn hub_device_json(s: &TestServer, id: &str) -> Value {
    s.hub_get(&format!("/devices/{id}")).await
}

/// Sends one telemetry message (QoS 1) and checks it was acknowledged and stored.
async fn send_telemetry(s: &TestServer, m: &mut Mqtt, id: &str, body: &str) {
    m.publish(&format!("devices/{id}/messages/events/"), QoS::AtLeastOnce, 7, body.as_bytes()).await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(a)) if a.pkid == 7));
    let events = s.stored_events().await;
    let sent = events.iter().rev().find(|e| e["event"]["origin"] == id).unwrap_or_else(|| panic!("{events:?}"));
    // The event says the sender authenticated with a certificate (issue 14 item 17), and which
    // generation of the identity it was.
    let annotations = &sent["event"]["annotations"];
    assert_eq!(
        annotations["iothub-connection-auth-method"],
        r#"{"scope":"device","type":"x509Certificate","issuer":"external","acceptingIpFilterRule":null}"#
    );
    assert_eq!(annotations["iothub-connection-auth-generation-id"], hub_device_json(s, id).await["generationId"]);
}

// ---------------------------------------------------------------------------------------------
// Success paths

#[tokio::test]
async fn a_group_ca_device_with_an_intermediate_provisions_connects_and_sends_telemetry() {
    let s = TestServer::start().await;
    let ca = root("Fleetgate Test Root");
    let inter = intermediate("Fleetgate Test Intermediate", &ca);
    let g = x509_group(&s, "x509-group", &ca).await;
    // The server filled in the certificate's info.
    let info = &g["attestation"]["x509"]["signingCertificates"]["primary"]["info"];
    assert_eq!(info["subjectName"], "CN=Fleetgate Test Root");
    assert_eq!(info["sha1Thumbprint"].as_str().unwrap().len(), 40);
    assert_eq!(info["version"], 3);
    // Reads leave the certificate out, as Azure.
    let read = s.service().get_enrollment_group("x509-group").await.unwrap();
    assert!(read["attestation"]["x509"]["signingCertificates"]["primary"].get("certificate").is_none());

    let dev = device("x509-dev-1", &inter);
    let (topic, body) = register_with(&s, "x509-dev-1", &chain(&[&dev, &inter]), &dev.key).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "{topic} {body}");
    assert_eq!(body["status"], "assigned");
    let st = &body["registrationState"];
    assert_eq!(st["deviceId"], "x509-dev-1");
    assert_eq!(st["assignedHub"], s.hub());
    assert!(st.get("symmetricKey").is_none(), "{st}");
    assert_eq!(st["x509"]["enrollmentGroupId"], "x509-group");
    assert_eq!(st["x509"]["certificateInfo"]["subjectName"], "CN=x509-dev-1");
    assert_eq!(st["x509"]["signingCertificateInfo"]["subjectName"], "CN=Fleetgate Test Root");

    let record = s.service().get_registration("x509-dev-1").await.unwrap();
    assert_eq!(record["status"], "assigned");
    let identity = hub_device_json(&s, "x509-dev-1").await;
    assert_eq!(identity["authentication"]["type"], "certificateAuthority", "{identity}");
    assert!(identity["authentication"]["symmetricKey"]["primaryKey"].is_null());

    let mut m = hub_connect(&s, "x509-dev-1", &chain(&[&dev, &inter]), &dev.key).await.unwrap();
    send_telemetry(&s, &mut m, "x509-dev-1", "hello from x509").await;
    // The same device registers again: the record is kept (creation time) and refreshed.
    let (topic, _) = register_with(&s, "x509-dev-1", &chain(&[&dev, &inter]), &dev.key).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"));
}

#[tokio::test]
async fn the_most_specific_group_wins_and_tls13_works_too() {
    let s = TestServer::start().await;
    let ca = root("root");
    let inter = intermediate("intermediate", &ca);
    x509_group(&s, "by-root", &ca).await;
    x509_group(&s, "by-intermediate", &inter).await;
    let dev = device("x509-dev-2", &inter);
    // TLS 1.3 this time (the Python SDK pins 1.2; others negotiate 1.3).
    let stream =
        s.tls_with_cert(s.mqtt_addr(), &chain(&[&dev, &inter, &ca]), &dev.key.serialize_pem(), true).await.unwrap();
    let mut m = Mqtt::from_stream(stream);
    let (topic, body) = register_on(&mut m, &s, "x509-dev-2").await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "{topic} {body}");
    assert_eq!(body["registrationState"]["x509"]["enrollmentGroupId"], "by-intermediate");
    // A device directly under the root belongs to the root's group.
    let direct = device("x509-dev-3", &ca);
    let (_, body) = register_with(&s, "x509-dev-3", &chain(&[&direct]), &direct.key).await;
    assert_eq!(body["registrationState"]["x509"]["enrollmentGroupId"], "by-root");
}

#[tokio::test]
async fn an_individual_enrollment_pins_the_device_certificate() {
    let s = TestServer::start().await;
    let dev = self_signed_device("x509-solo");
    let e = x509_enrollment(&s, "x509-solo", &dev, "enabled").await;
    let thumb = e["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha256Thumbprint"].clone();
    let (topic, body) = register_with(&s, "x509-solo", &dev.pem(), &dev.key).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "{topic} {body}");
    let x = &body["registrationState"]["x509"];
    assert!(x.get("enrollmentGroupId").is_none(), "{x}");
    assert_eq!(x["certificateInfo"]["sha256Thumbprint"], thumb);

    let identity = hub_device_json(&s, "x509-solo").await;
    assert_eq!(identity["authentication"]["type"], "selfSigned", "{identity}");
    assert_eq!(identity["authentication"]["x509Thumbprint"]["primaryThumbprint"], thumb);
    let mut m = hub_connect(&s, "x509-solo", &dev.pem(), &dev.key).await.unwrap();
    send_telemetry(&s, &mut m, "x509-solo", "solo").await;

    // Another certificate with the same name is not the enrolled one, at DPS or at the hub.
    let twin = self_signed_device("x509-solo");
    assert_eq!(
        hub_connect(&s, "x509-solo", &twin.pem(), &twin.key).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    let (topic, body) = register_with(&s, "x509-solo", &twin.pem(), &twin.key).await;
    assert!(topic.starts_with("$dps/registrations/res/401/"), "{topic} {body}");
}

#[tokio::test]
async fn x509_devices_register_over_https_with_their_tls_certificate() {
    let s = TestServer::start().await;
    let ca = root("root");
    x509_group(&s, "grp", &ca).await;
    let dev = device("x509-http", &ca);
    let identity = reqwest::Identity::from_pem(format!("{}{}", dev.key.serialize_pem(), dev.pem()).as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&s.ca_pem()).unwrap())
        .identity(identity)
        .build()
        .unwrap();
    let resp = http
        .put(s.url(&format!("/{}/registrations/x509-http/register?api-version=2021-06-01", s.scope())))
        .header("Content-Type", "application/json")
        .body(r#"{"registrationId":"x509-http"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["registrationState"]["x509"]["enrollmentGroupId"], "grp");
}

// ---------------------------------------------------------------------------------------------
// Refusals at DPS: 401 / 401002, nothing stored

#[tokio::test]
async fn unknown_ca_expired_cn_mismatch_and_bad_key_usage_are_refused() {
    let s = TestServer::start().await;
    let ca = root("root");
    x509_group(&s, "grp", &ca).await;

    let stranger_ca = root("root"); // same name, different key
    let d = device("x-unknown-ca", &stranger_ca);
    assert_refused(&s, "x-unknown-ca", register_with(&s, "x-unknown-ca", &d.pem(), &d.key).await).await;

    let d = issue(params("x-expired", false, (-30, -1)), &ca);
    assert_refused(&s, "x-expired", register_with(&s, "x-expired", &d.pem(), &d.key).await).await;

    let d = device("someone-else", &ca);
    assert_refused(&s, "x-cn-mismatch", register_with(&s, "x-cn-mismatch", &d.pem(), &d.key).await).await;

    let mut p = params("x-server-only", false, (-1, 30));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let d = issue(p, &ca);
    assert_refused(&s, "x-server-only", register_with(&s, "x-server-only", &d.pem(), &d.key).await).await;

    // Neither a certificate nor a password.
    let mut m = s.mqtt().await;
    assert_refused(&s, "x-nothing", register_on(&mut m, &s, "x-nothing").await).await;

    // A good device still registers afterwards.
    let d = device("x-good", &ca);
    let (topic, _) = register_with(&s, "x-good", &d.pem(), &d.key).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"));
}

#[tokio::test]
async fn a_disabled_individual_enrollment_revokes_one_device_of_a_group() {
    let s = TestServer::start().await;
    let ca = root("root");
    x509_group(&s, "grp", &ca).await;
    let dev = device("x-revoked", &ca);
    x509_enrollment(&s, "x-revoked", &dev, "disabled").await;
    assert_refused(&s, "x-revoked", register_with(&s, "x-revoked", &dev.pem(), &dev.key).await).await;
    // Its neighbours in the group are unaffected.
    let other = device("x-neighbour", &ca);
    let (topic, _) = register_with(&s, "x-neighbour", &other.pem(), &other.key).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"));
}

#[tokio::test]
async fn a_certificate_from_another_groups_ca_is_refused_where_the_device_is_enrolled() {
    let s = TestServer::start().await;
    let (ca_a, ca_b) = (root("ca-a"), root("ca-b"));
    x509_group(&s, "grp-a", &ca_a).await;
    x509_group(&s, "grp-b", &ca_b).await;
    // The device is enrolled individually with its own certificate, which takes precedence:
    // a certificate of the same name from group B's CA does not get it in.
    let own = device("x-pinned", &ca_a);
    x509_enrollment(&s, "x-pinned", &own, "enabled").await;
    let foreign = device("x-pinned", &ca_b);
    assert_refused(&s, "x-pinned", register_with(&s, "x-pinned", &foreign.pem(), &foreign.key).await).await;

    // At the hub, a device provisioned through group A cannot connect with group B's certificate.
    let dev = device("x-hub-a", &ca_a);
    let (topic, _) = register_with(&s, "x-hub-a", &dev.pem(), &dev.key).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"));
    let foreign = device("x-hub-a", &ca_b);
    assert_eq!(
        hub_connect(&s, "x-hub-a", &foreign.pem(), &foreign.key).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    assert!(hub_connect(&s, "x-hub-a", &dev.pem(), &dev.key).await.is_ok());
}

#[tokio::test]
async fn chains_longer_than_the_limit_are_refused() {
    let s = TestServer::start().await;
    let ca = root("root");
    x509_group(&s, "grp", &ca).await;
    let mut issuers = vec![ca];
    for i in 0..10 {
        let next = intermediate(&format!("i{i}"), issuers.last().unwrap());
        issuers.push(next);
    }
    // Leaf + five CAs under the enrolled root: a valid chain, but longer than DPS accepts.
    let dev = device("x-long", &issuers[5]);
    let mut certs: Vec<&Issued> = vec![&dev];
    certs.extend(issuers[1..=5].iter().rev());
    assert_refused(&s, "x-long", register_with(&s, "x-long", &chain(&certs), &dev.key).await).await;
    // Far beyond the limit, the handshake itself fails.
    let dev = device("x-longer", issuers.last().unwrap());
    let mut certs: Vec<&Issued> = vec![&dev];
    certs.extend(issuers[1..].iter().rev());
    let refused = s.tls_with_cert(s.mqtt_addr(), &chain(&certs), &dev.key.serialize_pem(), false).await;
    assert!(refused.is_err(), "an eleven-certificate chain was accepted");
}

// ---------------------------------------------------------------------------------------------
// Refusals at the hub: CONNACK 5

#[tokio::test]
async fn the_hub_refuses_missing_expired_and_misnamed_certificates() {
    let s = TestServer::start().await;
    let ca = root("root");
    x509_group(&s, "grp", &ca).await;
    let dev = device("x-hub", &ca);
    let (topic, _) = register_with(&s, "x-hub", &dev.pem(), &dev.key).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"));

    // No certificate at all (and no password).
    let mut m = s.mqtt().await;
    let user = format!("{}/x-hub/?api-version=2019-10-01", s.hub());
    assert!(matches!(m.connect("x-hub", &user, None, false, 60).await,
        Packet::ConnAck(a) if a.code == ConnectReturnCode::NotAuthorized));
    // Expired, or issued to another name by the right CA.
    let expired = issue(params("x-hub", false, (-30, -1)), &ca);
    assert_eq!(
        hub_connect(&s, "x-hub", &expired.pem(), &expired.key).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    let misnamed = device("x-other", &ca);
    assert_eq!(
        hub_connect(&s, "x-hub", &misnamed.pem(), &misnamed.key).await.err(),
        Some(ConnectReturnCode::NotAuthorized)
    );
    // A SAS device cannot use a certificate instead of its key.
    s.create_device("sas-dev").await;
    let cert = device("sas-dev", &ca);
    assert_eq!(hub_connect(&s, "sas-dev", &cert.pem(), &cert.key).await.err(), Some(ConnectReturnCode::NotAuthorized));
    // The real one still connects.
    assert!(hub_connect(&s, "x-hub", &dev.pem(), &dev.key).await.is_ok());
}

// ---------------------------------------------------------------------------------------------
// A hub connection ends with the certificate that opened it

/// Creates or replaces (`If-Match: *`) a `selfSigned` hub identity pinning `cert`.
async fn put_self_signed(s: &TestServer, id: &str, cert: &Issued, replace: bool) {
    let thumbprint = fleetgate_core::x509::Certificate::parse(&cert.pem()).unwrap().sha1_thumbprint();
    let mut req = s
        .http()
        .put(s.url(&format!("/devices/{id}?api-version=2021-04-12")))
        .header("Authorization", s.hub_token())
        .json(&json!({"deviceId": id, "authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": thumbprint}}}));
    if replace {
        req = req.header("If-Match", "*");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

#[tokio::test]
async fn a_certificate_connection_is_closed_when_the_identity_pins_another_certificate() {
    let s = TestServer::start().await;
    let (old, new) = (self_signed_device("x-pin"), self_signed_device("x-pin"));
    put_self_signed(&s, "x-pin", &old, false).await;
    let mut m = hub_connect(&s, "x-pin", &old.pem(), &old.key).await.expect("the pinned certificate connects");
    send_telemetry(&s, &mut m, "x-pin", "before").await;
    put_self_signed(&s, "x-pin", &new, true).await;
    assert!(m.recv().await.is_none(), "closed when the thumbprint changed");
    assert_eq!(hub_connect(&s, "x-pin", &old.pem(), &old.key).await.err(), Some(ConnectReturnCode::NotAuthorized));
    assert!(hub_connect(&s, "x-pin", &new.pem(), &new.key).await.is_ok());
}

#[tokio::test]
async fn a_certificate_connection_is_closed_when_the_certificate_expires() {
    let s = TestServer::start().await;
    let mut p = params("x-exp", false, (-1, 1));
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let cert = self_signed(p);
    put_self_signed(&s, "x-exp", &cert, false).await;
    let mut m = hub_connect(&s, "x-exp", &cert.pem(), &cert.key).await.expect("valid for 2 s more");
    send_telemetry(&s, &mut m, "x-exp", "while valid").await;
    // Keep-alive 60 s: only the certificate's notAfter can close it within `recv`'s 10 s.
    assert!(m.recv().await.is_none(), "closed when the certificate expired");
}

// ---------------------------------------------------------------------------------------------
// MQTT over WebSockets: the HTTPS connection's client certificate attests

#[tokio::test]
async fn x509_devices_register_over_mqtt_over_websockets() {
    use futures_util::{SinkExt, StreamExt};
    use rumqttc::mqttbytes::v4::{Connect, Login, Publish, Subscribe};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let s = TestServer::start().await;
    let ca = root("root");
    x509_group(&s, "grp-ws", &ca).await;
    let dev = device("x509-ws", &ca);
    let tls = s.tls_with_cert(s.https_addr(), &dev.pem(), &dev.key.serialize_pem(), false).await.unwrap();
    let mut req = format!("wss://localhost:{}/$iothub/websocket", s.https_addr().port()).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();

    let mut connect = Connect::new("x509-ws");
    connect.keep_alive = 60;
    connect.login = Some(Login::new(dps_username(&s.scope(), "x509-ws"), ""));
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    let body = json!({"payload": null, "registrationId": "x509-ws"}).to_string();
    let mut publish = Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtLeastOnce, body);
    publish.pkid = 2;
    for p in [Packet::Connect(connect), Packet::Subscribe(sub), Packet::Publish(publish)] {
        let mut b = bytes::BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        ws.send(Message::binary(b.to_vec())).await.unwrap();
    }
    let mut buf = bytes::BytesMut::new();
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            while let Ok(p) = Packet::read(&mut buf, 1 << 20) {
                match p {
                    Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success),
                    Packet::Publish(p) => {
                        return (p.topic.clone(), serde_json::from_slice::<Value>(&p.payload).unwrap())
                    }
                    _ => {}
                }
            }
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
                Some(Ok(_)) => {}
                other => panic!("the WebSocket ended: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(response.0.starts_with("$dps/registrations/res/200/"), "{response:?}");
    assert_eq!(response.1["registrationState"]["x509"]["enrollmentGroupId"], "grp-ws");
}

/// Issue 14 item 14: an X.509 device speaks HTTPS to the hub with its TLS client certificate and
/// no token (the hub named by `Host`, as the device SDKs send it); only for its own id.
#[tokio::test]
async fn x509_devices_send_telemetry_and_receive_c2d_over_https() {
    let s = TestServer::start().await;
    let cert = self_signed_device("x509-h");
    put_self_signed(&s, "x509-h", &cert, false).await;
    let other = self_signed_device("x509-o");
    put_self_signed(&s, "x509-o", &other, false).await;
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", cert.key.serialize_pem(), cert.pem()).as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&s.ca_pem()).unwrap())
        .identity(identity)
        .build()
        .unwrap();
    let url = |id: &str, tail: &str| s.url(&format!("/devices/{id}/messages/{tail}?api-version=2020-09-30"));
    let r = http.post(url("x509-h", "events")).header("Host", s.hub()).body("by certificate").send().await.unwrap();
    assert_eq!(r.status(), 204);
    let events = s.stored_events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"]["origin"], "x509-h");
    // The certificate is x509-h's: x509-o's queue and telemetry are closed to it.
    let r = http.post(url("x509-o", "events")).header("Host", s.hub()).body("spoofed").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(url("x509-o", "deviceBound")).header("Host", s.hub()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(url("x509-h", "deviceBound")).header("Host", s.hub()).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.stored_events().await.len(), 1);
}
