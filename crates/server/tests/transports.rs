//! The device transports of the HTTPS port: DPS over HTTPS (Azure's device REST contract, as the
//! Node, C and C# SDKs call it) and MQTT over WebSockets (DPS and hub, at `/$iothub/websocket`
//! and `/`, subprotocol `mqtt` or `MQTT`).

mod common;

use bytes::BytesMut;
use common::{device_token, dps_username, TestServer};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

const API: &str = "api-version=2021-06-01";
const JSON_UTF8: &str = "application/json; charset=utf-8";

// ---------------------------------------------------------------------------------------------
// DPS over HTTPS

/// A group, and a device key derived from its primary key for `reg`.
async fn enrolled(s: &TestServer, reg: &str) -> SymmetricKey {
    let (primary, _) = s.create_group("grp-http", json!({})).await;
    primary.derive_device_key(reg)
}

/// The C SDK's token: `skn=registration`.
fn c_token(key: &SymmetricKey, scope: &str, reg: &str) -> String {
    build_token(
        key,
        &format!("{scope}/registrations/{reg}"),
        Timestamp::now().unix_seconds() + 3600,
        Some("registration"),
    )
}

/// A request the way the C SDK sends it: `UserAgent` (no dash), no `User-Agent`.
fn c_request(s: &TestServer, method: reqwest::Method, path: &str, token: &str) -> reqwest::RequestBuilder {
    s.http()
        .request(method, s.url(path))
        .header("UserAgent", "prov_device_client/1.0")
        .header("Accept", "application/json")
        .header("Content-Type", "application/json; charset=utf-8")
        .header("Authorization", token)
}

async fn json_of(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
    (status, headers, body)
}

#[tokio::test]
async fn https_register_answers_200_assigned_at_once() {
    let s = TestServer::start().await;
    let key = enrolled(&s, "dev-h1").await;
    let path = format!("/{}/registrations/dev-h1/register?{API}", s.scope());
    let resp = c_request(&s, reqwest::Method::PUT, &path, &c_token(&key, &s.scope(), "dev-h1"))
        .body(r#"{"registrationId":"dev-h1","payload":{"model":"m1"}}"#)
        .send()
        .await
        .unwrap();
    let (status, headers, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], JSON_UTF8);
    assert_eq!(body["status"], "assigned");
    assert!(body["operationId"].as_str().is_some_and(|o| !o.is_empty()));
    let st = &body["registrationState"];
    assert_eq!(st["registrationId"], "dev-h1");
    assert_eq!(st["deviceId"], "dev-h1");
    assert_eq!(st["assignedHub"], s.hub());
    assert_eq!(st["status"], "assigned");
    assert_eq!(st["symmetricKey"]["enrollmentGroupId"], "grp-http");

    // The record exists for the service API too, and the hub identity was created.
    assert_eq!(s.service().get_registration("dev-h1").await.unwrap()["assignedHub"], s.hub());

    // An empty body (C# on some calls) and the Python-style token (no skn) work the same; the
    // `registrations` segment is matched in any case.
    let path = format!("/{}/Registrations/dev-h1/register?{API}&forceRegistration=true", s.scope());
    let resp = s
        .http()
        .put(s.url(&path))
        .header("Authorization", device_token(&key, &s.scope(), "dev-h1"))
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["registrationState"]["assignedHub"], s.hub());
}

#[tokio::test]
async fn https_register_202_then_poll_operation_status_200() {
    let s = TestServer::start_with(|c| c.immediate_assignment = false).await;
    let key = enrolled(&s, "dev-h2").await;
    let token = c_token(&key, &s.scope(), "dev-h2");
    let path = format!("/{}/registrations/dev-h2/register?{API}", s.scope());
    let resp =
        c_request(&s, reqwest::Method::PUT, &path, &token).body(r#"{"registrationId":"dev-h2"}"#).send().await.unwrap();
    let (status, headers, body) = json_of(resp).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(headers["content-type"], JSON_UTF8);
    assert_eq!(body["status"], "assigning");
    let op = body["operationId"].as_str().unwrap().to_owned();

    // Node sends `{}` as the body of its GET; C sends none.
    let path = format!("/{}/registrations/dev-h2/operations/{op}?{API}", s.scope());
    let resp = c_request(&s, reqwest::Method::GET, &path, &token).body("{}").send().await.unwrap();
    let (status, headers, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], JSON_UTF8);
    assert_eq!(body["operationId"], op.as_str());
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["assignedHub"], s.hub());
    let resp = c_request(&s, reqwest::Method::GET, &path, &token).send().await.unwrap();
    assert_eq!(json_of(resp).await.0, 200);
}

#[tokio::test]
async fn https_status_lookup_returns_the_devices_record() {
    let s = TestServer::start().await;
    let key = enrolled(&s, "dev-h3").await;
    let token = c_token(&key, &s.scope(), "dev-h3");
    let lookup = format!("/{}/registrations/dev-h3?{API}", s.scope());

    // Not registered yet: 404 in Azure's error shape.
    let resp = c_request(&s, reqwest::Method::POST, &lookup, &token).body(r#"{"registrationId":"dev-h3"}"#);
    let (status, headers, body) = json_of(resp.send().await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["content-type"], JSON_UTF8);
    assert_eq!(body["errorCode"].as_u64().unwrap() / 1000, 404);

    let register = format!("/{}/registrations/dev-h3/register?{API}", s.scope());
    let resp = c_request(&s, reqwest::Method::PUT, &register, &token).body("{}").send().await.unwrap();
    assert_eq!(json_of(resp).await.0, 200);

    let resp = c_request(&s, reqwest::Method::POST, &lookup, &token).body(r#"{"registrationId":"dev-h3"}"#);
    let (status, headers, body) = json_of(resp.send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], JSON_UTF8);
    assert_eq!(body["registrationId"], "dev-h3");
    assert_eq!(body["assignedHub"], s.hub());
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["symmetricKey"]["enrollmentGroupId"], "grp-http");

    // Another device's token does not read this record.
    let other = c_token(&key, &s.scope(), "dev-other");
    let resp = c_request(&s, reqwest::Method::POST, &lookup, &other).send().await.unwrap();
    assert_eq!(json_of(resp).await.0, 401);
}

#[tokio::test]
async fn https_wrong_key_is_401002_json() {
    let s = TestServer::start().await;
    let _ = enrolled(&s, "dev-h4").await;
    let wrong = SymmetricKey::generate();
    let register = format!("/{}/registrations/dev-h4/register?{API}", s.scope());
    for token in [c_token(&wrong, &s.scope(), "dev-h4"), String::new(), "garbage".into()] {
        let mut req = s.http().put(s.url(&register)).body(r#"{"registrationId":"dev-h4"}"#);
        if !token.is_empty() {
            req = req.header("Authorization", token);
        }
        let (status, headers, body) = json_of(req.send().await.unwrap()).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(headers["content-type"], JSON_UTF8);
        assert_eq!(headers["x-ms-error-code"], "401002");
        assert_eq!(body["errorCode"], 401002);
        assert!(body["trackingId"].is_string());
    }
    // A wrong ID scope is the same 401.
    let key = s.create_group("grp-2", json!({})).await.0.derive_device_key("dev-h4");
    let path = format!("/0ne99999999/registrations/dev-h4/register?{API}");
    let resp = s.http().put(s.url(&path)).header("Authorization", c_token(&key, "0ne99999999", "dev-h4")).send();
    assert_eq!(json_of(resp.await.unwrap()).await.0, 401);
    // Nothing was recorded.
    assert!(s.service().get_registration("dev-h4").await.is_err());
}

#[tokio::test]
async fn https_unknown_operation_is_404_and_bad_bodies_are_400() {
    let s = TestServer::start().await;
    let key = enrolled(&s, "dev-h5").await;
    let token = c_token(&key, &s.scope(), "dev-h5");
    let register = format!("/{}/registrations/dev-h5/register?{API}", s.scope());
    let resp = c_request(&s, reqwest::Method::PUT, &register, &token).body("{}").send().await.unwrap();
    assert_eq!(json_of(resp).await.0, 200);

    let path = format!("/{}/registrations/dev-h5/operations/4.0000000000000000.nope?{API}", s.scope());
    let (status, headers, body) =
        json_of(c_request(&s, reqwest::Method::GET, &path, &token).send().await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["content-type"], JSON_UTF8);
    assert_eq!(body["errorCode"].as_u64().unwrap() / 1000, 404);

    let resp = c_request(&s, reqwest::Method::PUT, &register, &token).body("[1,2]").send().await.unwrap();
    let (status, _, body) = json_of(resp).await;
    assert_eq!(status, 400, "{body}");
    let resp = c_request(&s, reqwest::Method::PUT, &register, &token).body("{not json").send().await.unwrap();
    assert_eq!(json_of(resp).await.0, 400);
    // Wrong method on a device route: JSON 405, not an empty body.
    let resp = c_request(&s, reqwest::Method::DELETE, &register, &token).send().await.unwrap();
    let (status, headers, _) = json_of(resp).await;
    assert_eq!(status, 405);
    assert_eq!(headers["content-type"], JSON_UTF8);
}

#[tokio::test]
async fn device_routes_do_not_shadow_the_service_api() {
    let s = TestServer::start().await;
    let key = enrolled(&s, "dev-h6").await;
    let register = format!("/{}/registrations/dev-h6/register?{API}", s.scope());
    let resp = c_request(&s, reqwest::Method::PUT, &register, &c_token(&key, &s.scope(), "dev-h6")).body("{}");
    assert_eq!(json_of(resp.send().await.unwrap()).await.0, 200);

    // `/registrations/{id}/query` (3 segments, like a device status lookup) is still the service's.
    let resp = s
        .http()
        .post(s.url("/registrations/grp-http/query?api-version=2021-10-01"))
        .header("Authorization", s.service_token())
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["registrationId"], "dev-h6");
    // ... and needs a service token: a device token is refused there.
    let resp = s
        .http()
        .post(s.url("/registrations/grp-http/query?api-version=2021-10-01"))
        .header("Authorization", c_token(&key, &s.scope(), "dev-h6"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let rec = s.service().get_registration("dev-h6").await.unwrap();
    assert_eq!(rec["registrationId"], "dev-h6");
}

// ---------------------------------------------------------------------------------------------
// MQTT over WebSockets

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Opens a WebSocket to `path` on the HTTPS port, offering `protocols`.
async fn ws_connect(s: &TestServer, path: &str, protocols: Option<&str>) -> Result<(Ws, Option<String>), WsError> {
    let tls = s.tls_to(s.https_addr(), &[&rustls::version::TLS12]).await;
    let mut req = format!("wss://localhost:{}{path}", s.https_addr().port()).into_client_request().unwrap();
    if let Some(p) = protocols {
        req.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::client_async(req, tls).await?;
    let chosen = resp.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_owned());
    Ok((ws, chosen))
}

/// MQTT packets over a WebSocket: each sent packet is one binary message unless split on purpose.
struct WsMqtt {
    ws: Ws,
    buf: BytesMut,
}

impl WsMqtt {
    async fn open(s: &TestServer, path: &str, protocol: &str) -> Self {
        let (ws, chosen) = ws_connect(s, path, Some(protocol)).await.expect("WebSocket upgrade");
        assert_eq!(chosen.as_deref(), Some(protocol), "the offered subprotocol is echoed as offered");
        Self { ws, buf: BytesMut::new() }
    }

    fn bytes(p: Packet) -> Vec<u8> {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        b.to_vec()
    }

    async fn send(&mut self, p: Packet) {
        self.ws.send(Message::binary(Self::bytes(p))).await.unwrap();
    }

    /// Sends `p` split over several WebSocket messages.
    async fn send_split(&mut self, p: Packet) {
        let b = Self::bytes(p);
        let (a, rest) = b.split_at(1);
        let (m, z) = rest.split_at(rest.len() / 2);
        for part in [a, m, z] {
            self.ws.send(Message::binary(part.to_vec())).await.unwrap();
        }
    }

    /// The next MQTT packet; `None` once the server closed.
    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if !self.buf.is_empty() {
                    match Packet::read(&mut self.buf, 1 << 20) {
                        Ok(p) => return Some(p),
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(e) => panic!("server sent a malformed packet: {e:?}"),
                    }
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(Message::Text(t))) => panic!("server sent a text message: {t}"),
                    Some(Ok(_)) => {}
                }
            }
        })
        .await
        .expect("server neither answered nor closed within 10 s")
    }

    async fn connect(&mut self, client_id: &str, username: &str, password: &str, split: bool) -> ConnectReturnCode {
        let mut c = Connect::new(client_id);
        c.keep_alive = 60;
        c.login = Some(Login::new(username, password));
        if split {
            self.send_split(Packet::Connect(c)).await;
        } else {
            self.send(Packet::Connect(c)).await;
        }
        match self.recv().await {
            Some(Packet::ConnAck(a)) => {
                assert!(!a.session_present);
                a.code
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

/// A DPS registration over MQTT over WebSockets, Python-style; returns the response topic and body.
async fn ws_register(s: &TestServer, path: &str, protocol: &str, reg: &str) -> (String, Value) {
    let (primary, _) = s.create_group(&format!("grp-{reg}"), json!({})).await;
    let key = primary.derive_device_key(reg);
    let mut m = WsMqtt::open(s, path, protocol).await;
    let code = m.connect(reg, &dps_username(&s.scope(), reg), &device_token(&key, &s.scope(), reg), true).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    m.send(Packet::Subscribe(sub)).await;
    assert!(matches!(m.recv().await, Some(Packet::SubAck(_))));
    let body = json!({"payload": null, "registrationId": reg}).to_string();
    let mut p = Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=ws-1", QoS::AtLeastOnce, body.into_bytes());
    p.pkid = 2;
    m.send(Packet::Publish(p)).await;
    match m.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.pkid, 2),
        other => panic!("PUBACK must come first, got {other:?}"),
    }
    match m.recv().await {
        Some(Packet::Publish(p)) => (p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()),
        other => panic!("expected the response, got {other:?}"),
    }
}

#[tokio::test]
async fn dps_register_over_websocket_at_iothub_path() {
    let s = TestServer::start().await;
    let (topic, body) = ws_register(&s, "/$iothub/websocket", "mqtt", "dev-ws1").await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=ws-1");
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["assignedHub"], s.hub());
    assert_eq!(s.service().get_registration("dev-ws1").await.unwrap()["status"], "assigned");
}

#[tokio::test]
async fn dps_register_over_websocket_at_root_with_uppercase_subprotocol() {
    let s = TestServer::start().await;
    let (topic, body) = ws_register(&s, "/", "MQTT", "dev-ws2").await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=ws-1");
    assert_eq!(body["registrationState"]["deviceId"], "dev-ws2");
}

#[tokio::test]
async fn dps_over_websocket_with_a_wrong_key_gets_the_same_401_as_tcp() {
    let s = TestServer::start().await;
    s.create_group("grp-1", json!({})).await;
    let mut m = WsMqtt::open(&s, "/$iothub/websocket", "mqtt").await;
    let token = device_token(&SymmetricKey::generate(), &s.scope(), "dev-ws3");
    assert_eq!(
        m.connect("dev-ws3", &dps_username(&s.scope(), "dev-ws3"), &token, false).await,
        ConnectReturnCode::Success
    );
    let mut p = Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtMostOnce, b" ".to_vec());
    p.pkid = 0;
    m.send(Packet::Publish(p)).await;
    match m.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic, "$dps/registrations/res/401/?$rid=1");
            let body: Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(body["errorCode"], 401002);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn hub_telemetry_over_websocket_is_acked_and_stored() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-ws4").await;
    let hub = s.hub();
    let token = build_token(&key, &format!("{hub}/devices/dev-ws4"), Timestamp::now().unix_seconds() + 3600, None);
    let mut m = WsMqtt::open(&s, "/$iothub/websocket", "mqtt").await;
    // CONNECT split over three WebSocket messages.
    let user = format!("{hub}/dev-ws4/?api-version=2021-04-12");
    assert_eq!(m.connect("dev-ws4", &user, &token, true).await, ConnectReturnCode::Success);
    let mut p =
        Publish::new("devices/dev-ws4/messages/events/%24.mid=m1&k=v", QoS::AtLeastOnce, br#"{"t":1}"#.to_vec());
    p.pkid = 9;
    // Two packets in one WebSocket message: the PUBLISH and a PINGREQ.
    let mut both = WsMqtt::bytes(Packet::Publish(p));
    both.extend(WsMqtt::bytes(Packet::PingReq));
    m.ws.send(Message::binary(both)).await.unwrap();
    let mut got_puback = false;
    let mut got_pong = false;
    while !(got_puback && got_pong) {
        match m.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(a.pkid, 9);
                got_puback = true;
            }
            Some(Packet::PingResp) => got_pong = true,
            other => panic!("{other:?}"),
        }
    }
    let events = s.stored_events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"]["origin"], "dev-ws4");
    assert_eq!(events[0]["event"]["payload"], json!({"t": 1}));
    assert_eq!(events[0]["event"]["properties"]["system"]["message-id"], "m1");
    assert_eq!(events[0]["event"]["properties"]["application"]["k"], "v");

    // A wrong key over WebSockets is refused as over TCP.
    let mut m = WsMqtt::open(&s, "/", "mqtt").await;
    let bad = build_token(&SymmetricKey::generate(), &format!("{hub}/devices/dev-ws4"), 9_999_999_999, None);
    assert_eq!(m.connect("dev-ws4", &user, &bad, false).await, ConnectReturnCode::NotAuthorized);
}

#[tokio::test]
async fn upgrades_without_the_mqtt_subprotocol_are_refused() {
    let s = TestServer::start().await;
    for (path, protocol) in
        [("/$iothub/websocket", None), ("/", Some("chat")), ("/$iothub/websocket", Some("mqttv3.1"))]
    {
        match ws_connect(&s, path, protocol).await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status(), 400, "{path} {protocol:?}");
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["errorCode"], 400004);
            }
            Err(e) => panic!("{path} {protocol:?}: {e}"),
            Ok(_) => panic!("{path} {protocol:?}: upgrade accepted"),
        }
    }
    // Several offered: the mqtt one is chosen, echoed as offered.
    let (_, chosen) = ws_connect(&s, "/$iothub/websocket", Some("chat, MQTT")).await.unwrap();
    assert_eq!(chosen.as_deref(), Some("MQTT"));
    // A plain GET on an upgrade path is a JSON 400, and other paths are unaffected.
    let resp = s.http().get(s.url("/$iothub/websocket")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["content-type"], JSON_UTF8);
    assert_eq!(s.http().get(s.url("/healthz")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_websocket_that_sends_no_connect_is_dropped_after_the_handshake_deadline() {
    let s = TestServer::start().await; // handshake_timeout is 700 ms in tests
    let mut m = WsMqtt::open(&s, "/$iothub/websocket", "mqtt").await;
    let started = std::time::Instant::now();
    assert!(m.recv().await.is_none());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Text messages are not MQTT: the connection is closed.
    let mut m = WsMqtt::open(&s, "/$iothub/websocket", "mqtt").await;
    m.ws.send(Message::text("hello")).await.unwrap();
    assert!(m.recv().await.is_none());
}

/// A registration id that spells a route word (`Events`, `Query`) keeps its case over HTTPS: its
/// key is derived from the id as sent, and folding it to lower case refused the device for good.
#[tokio::test]
async fn https_register_keeps_ids_that_spell_route_words() {
    let s = TestServer::start().await;
    let (group_key, _) = s.create_group("grp-words", json!({})).await;
    for id in ["Events", "Query", "Devices"] {
        let key = group_key.derive_device_key(id);
        let path = format!("/{}/registrations/{id}/register?{API}", s.scope());
        let resp = c_request(&s, reqwest::Method::PUT, &path, &c_token(&key, &s.scope(), id))
            .body(format!(r#"{{"registrationId":"{id}"}}"#))
            .send()
            .await
            .unwrap();
        let (status, _, body) = json_of(resp).await;
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["registrationState"]["deviceId"], id);
    }
}
