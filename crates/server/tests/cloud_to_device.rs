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
    use fleetgate_store::Store;
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
