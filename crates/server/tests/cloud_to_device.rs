//! Cloud-to-device messages as Azure documents them beyond sending: purging a device's queue,
//! delivery feedback (`iothub-ack`) read from `/messages/serviceBound/feedback`, and the
//! device-side HTTPS endpoints (telemetry, receive/complete/reject/abandon with lock tokens).

mod common;

use common::TestServer;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;

const V: &str = "?api-version=2021-04-12";

async fn send(s: &TestServer, device: &str, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = s
        .http()
        .post(s.url(&format!("/devices/{device}/messages/deviceBound{V}")))
        .header("Authorization", s.hub_token())
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn service(s: &TestServer, method: reqwest::Method, path: &str) -> reqwest::Response {
    let sep = if path.contains('?') { '&' } else { '?' };
    s.http()
        .request(method, s.url(&format!("{path}{sep}api-version=2021-04-12")))
        .header("Authorization", s.hub_token())
        .send()
        .await
        .unwrap()
}

/// Issue 14 item 13: `DELETE /devices/{id}/commands` empties the queue and answers Azure's
/// `PurgeMessageQueueResult`; a connecting device then gets nothing.
#[tokio::test]
async fn purge_empties_a_devices_queue() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-p").await;
    s.create_device("dev-other").await;
    for i in 0..3 {
        assert_eq!(send(&s, "dev-p", &format!("m{i}"), &[]).await.status(), 204);
    }
    assert_eq!(send(&s, "dev-other", "keep", &[]).await.status(), 204);
    let resp = service(&s, reqwest::Method::DELETE, "/devices/dev-p/commands").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"deviceId": "dev-p", "totalMessagesPurged": 3}));
    // Purging again: nothing left.
    let again: Value = service(&s, reqwest::Method::DELETE, "/devices/dev-p/commands").await.json().await.unwrap();
    assert_eq!(again["totalMessagesPurged"], 0);
    // Another device's queue is untouched; an unknown device is 404.
    let store = s.store();
    use fleetgate_store::DeviceQueue;
    assert_eq!(store.pending_c2d(&s.hub(), "dev-other", 0).await.unwrap().len(), 1);
    assert_eq!(service(&s, reqwest::Method::DELETE, "/devices/nobody/commands").await.status(), 404);
    // A message sent after the purge is the first the device gets.
    assert_eq!(send(&s, "dev-p", "after", &[]).await.status(), 204);
    let mut m = s.hub_device("dev-p", &key).await.unwrap();
    m.subscribe("devices/dev-p/messages/devicebound/#", QoS::AtLeastOnce, 1).await;
    let p = m.next_publish().await;
    assert_eq!(&p.payload[..], b"after");
    m.send(Packet::PubAck(PubAck::new(p.pkid))).await;
}

/// The feedback receive: `(status, records, lock token)`.
async fn feedback(s: &TestServer) -> (u16, Vec<Value>, String) {
    let resp = service(s, reqwest::Method::GET, "/messages/serviceBound/feedback").await;
    let status = resp.status().as_u16();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().trim_matches('"').to_owned()).unwrap_or_default();
    if status == 200 {
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(ct, "application/vnd.microsoft.iothub.feedback.json");
    }
    let records = if status == 200 { resp.json().await.unwrap() } else { Vec::new() };
    (status, records, etag)
}

fn codes(records: &[Value]) -> Vec<(String, String)> {
    let mut v: Vec<_> = records
        .iter()
        .map(|r| (r["originalMessageId"].as_str().unwrap().to_owned(), r["statusCode"].as_str().unwrap().to_owned()))
        .collect();
    v.sort();
    v
}

/// Issue 14 item 12: `iothub-ack` decides which outcomes make feedback records (positive:
/// completed; negative: expired, purged…; full: all; none: never); the service reads them as a
/// locked batch, abandons (they come back) and completes (they are gone).
#[tokio::test]
async fn ack_modes_make_azures_feedback_records() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-f").await;
    s.create_device("dev-g").await;
    assert_eq!(send(&s, "dev-f", "x", &[("iothub-ack", "sometimes")]).await.status(), 400);
    assert_eq!(feedback(&s).await.0, 204, "no feedback before any message");
    // Expires undelivered (dev-g never connects): its time to live, 1 s, is over once the
    // clock's second after the next has begun.
    let h = [("iothub-ack", "negative"), ("iothub-messageid", "neg-3"), ("iothub-ttl", "1")];
    let sent = tokio::time::Instant::now();
    assert_eq!(send(&s, "dev-g", "short-lived", &h).await.status(), 204);
    for (mid, ack) in [("full-1", "full"), ("pos-1", "positive"), ("neg-1", "negative"), ("none-1", "none")] {
        assert_eq!(send(&s, "dev-f", mid, &[("iothub-ack", ack), ("iothub-messageid", mid)]).await.status(), 204);
    }
    // The device completes all four over MQTT.
    let mut m = s.hub_device("dev-f", &key).await.unwrap();
    m.subscribe("devices/dev-f/messages/devicebound/#", QoS::AtLeastOnce, 1).await;
    for _ in 0..4 {
        let p = m.next_publish().await;
        m.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    }
    // PUBACKs are processed in order; a ping answered means all four were handled.
    m.send(Packet::PingReq).await;
    while !matches!(m.recv().await, Some(Packet::PingResp)) {}
    drop(m);
    // Purged and expired: negative and full ask for them.
    for (mid, ack) in [("neg-2", "negative"), ("full-2", "full"), ("pos-2", "positive")] {
        assert_eq!(send(&s, "dev-f", mid, &[("iothub-ack", ack), ("iothub-messageid", mid)]).await.status(), 204);
    }
    assert_eq!(service(&s, reqwest::Method::DELETE, "/devices/dev-f/commands").await.status(), 200);

    // The expiry is a matter of time passing, not of an event to wait for.
    tokio::time::sleep_until(sent + std::time::Duration::from_millis(2100)).await;
    let (status, records, lock) = feedback(&s).await;
    assert_eq!(status, 200);
    let want = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        codes(&records),
        vec![
            want("full-1", "Success"),
            want("full-2", "Purged"),
            want("neg-2", "Purged"),
            want("neg-3", "Expired"),
            want("pos-1", "Success"),
        ]
    );
    let dev: Value = s.hub_get("/devices/dev-f").await;
    for r in records.iter().filter(|r| r["originalMessageId"] != "neg-3") {
        assert_eq!(r["deviceId"], "dev-f");
        assert_eq!(r["deviceGenerationId"], dev["generationId"]);
    }
    assert!(records.iter().any(|r| r["originalMessageId"] == "neg-3" && r["deviceId"] == "dev-g"));
    for r in &records {
        assert!(r["enqueuedTimeUtc"].as_str().unwrap().ends_with('Z'), "{r}");
        assert!(r["description"].as_str().is_some_and(|d| !d.is_empty()), "{r}");
    }
    // Locked: a second receive gets nothing until the batch is abandoned.
    assert_eq!(feedback(&s).await.0, 204);
    let r = service(&s, reqwest::Method::POST, &format!("/messages/serviceBound/feedback/{lock}/abandon")).await;
    assert_eq!(r.status(), 204);
    let (status, again, lock) = feedback(&s).await;
    assert_eq!((status, codes(&again)), (200, codes(&records)));
    // A wrong lock token is "lock lost"; the right one completes the batch.
    let r = service(&s, reqwest::Method::DELETE, "/messages/serviceBound/feedback/not-a-lock").await;
    assert_eq!(r.status(), 412);
    assert_eq!(r.json::<Value>().await.unwrap()["errorCode"], 412020);
    let r = service(&s, reqwest::Method::DELETE, &format!("/messages/serviceBound/feedback/{lock}")).await;
    assert_eq!(r.status(), 204);
    assert_eq!(feedback(&s).await.0, 204);
}

/// A device's own SAS token (`sr` = `{hub}/devices/{id}`, no policy name), as the device SDKs'
/// HTTP transports sign it.
fn device_sas(s: &TestServer, id: &str, key: &fleetgate_core::keys::SymmetricKey) -> String {
    let expiry = fleetgate_core::time::Timestamp::now().unix_seconds() + 600;
    fleetgate_core::sas::build_token(key, &format!("{}/devices/{id}", s.hub()), expiry, None)
}

/// A request from a device over HTTPS (paths in the C SDK's case).
fn device_req(s: &TestServer, token: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let sep = if path.contains('?') { '&' } else { '?' };
    s.http().request(method, s.url(&format!("{path}{sep}api-version=2020-09-30"))).header("Authorization", token)
}

fn etag(r: &reqwest::Response) -> String {
    r.headers()["etag"].to_str().unwrap().to_owned()
}

/// Issue 14 item 14: a device that speaks only HTTPS sends telemetry (one message, and a batch
/// in Azure's `application/vnd.microsoft.iothub.json`), and receives, abandons, completes and
/// rejects cloud-to-device messages by lock token (`ETag`); only its own queue, only with its
/// own credentials.
#[tokio::test]
async fn a_device_speaks_https_to_the_hub() {
    let s = TestServer::start().await;
    let key = s.create_device("dev-h").await;
    let other_key = s.create_device("dev-o").await;
    let token = device_sas(&s, "dev-h", &key);
    let post = reqwest::Method::POST;

    // Telemetry: one message with its properties in headers.
    let r = device_req(&s, &token, post.clone(), "/devices/dev-h/messages/events")
        .header("iothub-messageid", "d2c-1")
        .header("iothub-app-temp-alert", "high")
        .body("one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // A batch: base64 and plain bodies, properties per item.
    let batch = serde_json::json!([
        {"body": "dHdv", "base64Encoded": true, "properties": {"iothub-app-n": "2", "iothub-messageid": "d2c-2"}},
        {"body": "three", "base64Encoded": false, "properties": {"iothub-app-n": "3"}},
    ]);
    let r = device_req(&s, &token, post.clone(), "/devices/dev-h/messages/events")
        .header("Content-Type", "application/vnd.microsoft.iothub.json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let events = s.stored_events().await;
    let bodies: Vec<_> = events.iter().map(|e| e["event"]["payload"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(bodies, ["one", "two", "three"], "{events:?}");
    assert!(events.iter().all(|e| e["event"]["origin"] == "dev-h"), "{events:?}");
    let text = serde_json::to_string(&events).unwrap();
    for needle in ["d2c-1", "temp-alert", "high", "d2c-2", "\"n\""] {
        assert!(text.contains(needle), "{needle} missing in {text}");
    }

    // Another device's token, a service-less request, a wrong key: 401, nothing sent.
    let r = device_req(&s, &device_sas(&s, "dev-o", &other_key), post.clone(), "/devices/dev-h/messages/events")
        .body("spoofed")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let wrong = device_sas(&s, "dev-h", &fleetgate_core::keys::SymmetricKey::generate());
    let r = device_req(&s, &wrong, reqwest::Method::GET, "/devices/dev-h/messages/deviceBound").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s.http().get(s.url("/devices/dev-h/messages/deviceBound?api-version=2020-09-30")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.stored_events().await.len(), 3);

    // Cloud-to-device: nothing yet.
    let get = || device_req(&s, &token, reqwest::Method::GET, "/devices/dev-h/messages/deviceBound").send();
    assert_eq!(get().await.unwrap().status(), 204);
    let h = [("iothub-messageid", "c2d-1"), ("iothub-app-color", "blue"), ("iothub-ack", "full")];
    assert_eq!(send(&s, "dev-h", "first", &h).await.status(), 204);
    let h = [("iothub-messageid", "c2d-2"), ("iothub-ack", "full")];
    assert_eq!(send(&s, "dev-h", "second", &h).await.status(), 204);
    // Another device cannot read dev-h's queue, even with a valid token of its own.
    let r = device_req(
        &s,
        &device_sas(&s, "dev-o", &other_key),
        reqwest::Method::GET,
        "/devices/dev-h/messages/deviceBound",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 401);

    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    let first_lock = etag(&r);
    assert_eq!(r.headers()["iothub-messageid"], "c2d-1");
    assert_eq!(r.headers()["iothub-app-color"], "blue");
    assert_eq!(r.headers()["iothub-deliverycount"], "1");
    assert_eq!(r.headers()["iothub-to"], "/devices/dev-h/messages/deviceBound");
    assert_eq!(r.text().await.unwrap(), "first");
    // Locked: the next receive gets the next message.
    let r = get().await.unwrap();
    assert_eq!(r.headers()["iothub-messageid"], "c2d-2");
    let second_lock = etag(&r);
    assert_eq!(get().await.unwrap().status(), 204);
    // Abandoned: it comes back, counted, under a new lock; the old lock is lost.
    let abandon = format!("/devices/dev-h/messages/deviceBound/{}/abandon", first_lock.trim_matches('"'));
    assert_eq!(device_req(&s, &token, post.clone(), &abandon).send().await.unwrap().status(), 204);
    let r = get().await.unwrap();
    assert_eq!(
        (r.headers()["iothub-messageid"].to_str().unwrap(), r.headers()["iothub-deliverycount"].to_str().unwrap()),
        ("c2d-1", "2")
    );
    let again = etag(&r);
    assert_ne!(again, first_lock);
    let del = |lock: &str, q: &str| {
        device_req(
            &s,
            &token,
            reqwest::Method::DELETE,
            &format!("/devices/dev-h/messages/deviceBound/{}{q}", lock.trim_matches('"')),
        )
        .header("If-Match", lock.to_owned())
        .send()
    };
    let r = del(&first_lock, "").await.unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(r.json::<Value>().await.unwrap()["errorCode"], 412020);
    // Complete one, reject the other.
    assert_eq!(del(&again, "").await.unwrap().status(), 204);
    assert_eq!(del(&second_lock, "?reject").await.unwrap().status(), 204);
    assert_eq!(get().await.unwrap().status(), 204);
    let (status, records, _) = feedback(&s).await;
    assert_eq!(status, 200);
    let want = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(codes(&records), vec![want("c2d-1", "Success"), want("c2d-2", "Rejected")]);

    // The MQTT path is unchanged: a message sent now reaches the device there.
    assert_eq!(send(&s, "dev-h", "over mqtt", &[]).await.status(), 204);
    let mut m = s.hub_device("dev-h", &key).await.unwrap();
    m.subscribe("devices/dev-h/messages/devicebound/#", QoS::AtLeastOnce, 1).await;
    assert_eq!(&m.next_publish().await.payload[..], b"over mqtt");
}

/// Issue 14 item 14: a message delivered (locked) the maximum number of times without being
/// completed is dead-lettered (feedback `DeliveryCountExceeded`); a lock that lapses makes the
/// message available again.
#[tokio::test]
async fn https_receive_has_a_lock_timeout_and_a_delivery_limit() {
    let s = TestServer::start_with(|c| {
        c.hub.c2d_max_delivery_count = 2;
        c.hub.c2d_lock = std::time::Duration::from_secs(2);
    })
    .await;
    let key = s.create_device("dev-l").await;
    let token = device_sas(&s, "dev-l", &key);
    let get = || device_req(&s, &token, reqwest::Method::GET, "/devices/dev-l/messages/deviceBound").send();
    let h = [("iothub-messageid", "c2d-l"), ("iothub-ack", "negative")];
    assert_eq!(send(&s, "dev-l", "again and again", &h).await.status(), 204);
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    let locked_at = tokio::time::Instant::now();
    assert_eq!(get().await.unwrap().status(), 204, "locked");
    // The lock lapses (2 s, counted in whole seconds): the message is there again.
    tokio::time::sleep_until(locked_at + std::time::Duration::from_millis(3100)).await;
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["iothub-deliverycount"], "2");
    let abandon = format!("/devices/dev-l/messages/deviceBound/{}/abandon", etag(&r).trim_matches('"'));
    assert_eq!(device_req(&s, &token, reqwest::Method::POST, &abandon).send().await.unwrap().status(), 204);
    // Delivered twice, the maximum: dead-lettered instead of a third delivery.
    assert_eq!(get().await.unwrap().status(), 204);
    let (status, records, _) = feedback(&s).await;
    assert_eq!(status, 200);
    assert_eq!(codes(&records), vec![("c2d-l".to_owned(), "DeliveryCountExceeded".to_owned())]);
}
