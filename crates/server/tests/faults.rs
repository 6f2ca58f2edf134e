//! What the server answers when its storage fails, when a source floods it with refused
//! requests, and who may read /metrics (issue 12).

mod common;

use std::time::Duration;

use common::{device_token, dps_username, wait_until, TestServer};
use fleetgate_core::audit::{AuditEntry, AuditQuery};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::refusals::RefusalLimits;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use fleetgate_store::{AuditSink, Faults, InstanceStore};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use rumqttc::mqttbytes::QoS;
use serde_json::json;

async fn with_faults() -> (TestServer, Faults) {
    let faults = Faults::default();
    let f = faults.clone();
    let s = TestServer::start_with(move |c| c.faults = Some(f)).await;
    (s, faults)
}

async fn readyz(s: &TestServer) -> u16 {
    s.http().get(s.url("/readyz")).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn hub_connect_while_the_store_fails_is_server_unavailable_then_works() {
    let (s, faults) = with_faults().await;
    let key = s.create_device("dev-1").await;
    faults.fail_reads(true);
    // Not "not authorized" (5): the SDKs would never retry, even after the store is repaired.
    assert_eq!(s.hub_device("dev-1", &key).await.err(), Some(ConnectReturnCode::ServiceUnavailable));
    // The service APIs too: "retry later", not "unauthorized" (and no refusal is recorded).
    let hub_api = s.http().get(s.url("/devices/dev-1?api-version=2021-04-12")).header("authorization", s.hub_token());
    assert_eq!(hub_api.send().await.unwrap().status(), 503);
    let dps_api =
        s.http().get(s.url("/enrollmentgroups/g?api-version=2021-10-01")).header("authorization", s.service_token());
    assert_eq!(dps_api.send().await.unwrap().status(), 503);
    faults.fail_reads(false);
    assert!(s.hub_device("dev-1", &key).await.is_ok());
    // A wrong key is still "not authorized".
    assert_eq!(s.hub_device("dev-1", &SymmetricKey::generate()).await.err(), Some(ConnectReturnCode::NotAuthorized));
}

#[tokio::test]
async fn registration_while_the_store_fails_is_503_with_retry_after_then_works() {
    let (s, faults) = with_faults().await;
    let (primary, _) = s.create_group("grp", json!({})).await;
    let key = primary.derive_device_key("dev-r");
    faults.fail_all(true);
    let (topic, body) = s.register("dev-r", &key, None).await;
    assert!(topic.starts_with("$dps/registrations/res/503/?$rid=r0&retry-after="), "{topic} {body}");
    assert_eq!(body["errorCode"], 503000);

    // DPS over HTTPS: 503 and a Retry-After header.
    let url = s.url(&format!("/{}/registrations/dev-r/register?api-version=2021-06-01", s.scope()));
    let token = device_token(&key, &s.scope(), "dev-r");
    let put = || s.http().put(&url).header("authorization", &token).json(&json!({"registrationId": "dev-r"}));
    let resp = put().send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());

    faults.fail_all(false);
    let (_, body) = s.register("dev-r", &key, None).await;
    assert_eq!(body["status"], "assigned");
    assert_eq!(put().send().await.unwrap().status(), 200);
}

/// A hub service API change the store cannot write is "retry later" (503), as on the DPS API.
#[tokio::test]
async fn hub_api_writes_while_the_store_fails_are_503() {
    let (s, faults) = with_faults().await;
    s.create_device("dev-1").await;
    faults.fail_writes(true);
    let put = s
        .http()
        .put(s.url("/devices/dev-2?api-version=2021-04-12"))
        .header("authorization", s.hub_token())
        .json(&json!({"deviceId": "dev-2"}));
    assert_eq!(put.send().await.unwrap().status(), 503);
    let patch = s
        .http()
        .patch(s.url("/twins/dev-1?api-version=2021-04-12"))
        .header("authorization", s.hub_token())
        .json(&json!({"tags": {"a": 1}}));
    assert_eq!(patch.send().await.unwrap().status(), 503);
    faults.fail_writes(false);
    s.create_device("dev-2").await;
}

#[tokio::test]
async fn readyz_is_503_while_writes_fail() {
    let (s, faults) = with_faults().await;
    assert_eq!(readyz(&s).await, 200);
    // Reads still answer (the old check only read a setting): only a write shows it.
    faults.fail_writes(true);
    wait_until("not ready while writes fail", async || readyz(&s).await == 503).await;
    let body = s.http().get(s.url("/readyz")).send().await.unwrap().text().await.unwrap();
    assert!(body.contains("not ready"), "{body}");
    faults.fail_writes(false);
    wait_until("ready again", async || readyz(&s).await == 200).await;
    faults.fail_reads(true);
    wait_until("not ready while reads fail", async || readyz(&s).await == 503).await;
}

#[tokio::test]
async fn metrics_on_https_need_a_dps_policy_with_a_read_right() {
    let s = TestServer::start().await;
    let get = |auth: Option<String>| {
        let mut r = s.http().get(s.url("/metrics"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some(s.hub_token())).await.unwrap().status(), 401, "a hub's policy is not a DPS policy");
    let owner = get(Some(s.service_token())).await.unwrap();
    assert_eq!(owner.status(), 200);
    assert!(owner.text().await.unwrap().contains("fleetgate_connections"));
    let token_of = |name: &str, policies: &[fleetgate_core::policy::AccessPolicy]| {
        let p = policies.iter().find(|p| p.key_name == name).unwrap();
        let key = SymmetricKey::from_base64(&p.primary_key).unwrap();
        build_token(&key, "localhost", Timestamp::now().unix_seconds() + 600, Some(name))
    };
    let policies = s.store().policies("dps").await.unwrap();
    assert_eq!(get(Some(token_of("registrationstatusread", &policies))).await.unwrap().status(), 200);
    assert_eq!(get(Some(token_of("enrollmentread", &policies))).await.unwrap().status(), 401);
}

#[tokio::test]
async fn metrics_listen_serves_plain_http_without_credentials() {
    let s = TestServer::start_with(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = s.running().metrics_addr.expect("a metrics listener");
    let plain = reqwest::Client::new();
    let resp = plain.get(format!("http://{addr}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("fleetgate_connections"));
    assert_eq!(plain.get(format!("http://{addr}/enrollmentgroups/x")).send().await.unwrap().status(), 404);
    // The HTTPS port still wants a token.
    assert_eq!(s.http().get(s.url("/metrics")).send().await.unwrap().status(), 401);
}

fn from_loopback(e: &AuditEntry) -> bool {
    e.source.as_deref() == Some("127.0.0.1")
}

#[tokio::test]
async fn a_flood_of_refused_requests_is_a_few_entries_a_summary_and_then_429() {
    let refusals = RefusalLimits {
        window: Duration::from_secs(3),
        max_failures: 40,
        backoff: Duration::from_secs(8),
        recorded: 3,
        ..RefusalLimits::default()
    };
    let s = TestServer::start_with(move |c| c.audit.refusals = refusals).await;
    let (primary, _) = s.create_group("grp", json!({})).await;
    let http = s.http();
    let bad = build_token(&SymmetricKey::generate(), "localhost", Timestamp::now().unix_seconds() + 600, Some("x"));
    let mut statuses = Vec::new();
    for _ in 0..300 {
        let resp = http.delete(s.url("/enrollmentgroups/grp")).header("authorization", &bad).send().await.unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            let wait: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=8).contains(&wait), "{wait}");
        }
    }
    assert_eq!(statuses.iter().filter(|&&c| c == 401).count(), 40);
    assert_eq!(statuses.iter().filter(|&&c| c == 429).count(), 260);

    // Turned away unchecked everywhere, even with good credentials: the hub over MQTT...
    let key = SymmetricKey::generate();
    assert_eq!(s.hub_device("dev-1", &key).await.err(), Some(ConnectReturnCode::ServiceUnavailable));
    // ... DPS over MQTT (a 429 the SDKs retry) ...
    let (topic, _) = s.register("dev-d", &primary.derive_device_key("dev-d"), None).await;
    assert!(topic.starts_with("$dps/registrations/res/429/?$rid=r0&retry-after="), "{topic}");
    // ... and the service API.
    let resp =
        http.get(s.url("/enrollmentgroups/grp")).header("authorization", s.service_token()).send().await.unwrap();
    assert_eq!(resp.status(), 429);

    // The trail holds the first three refusals and, once the window and the backoff are over,
    // one summary of the rest.
    let store = s.store();
    wait_until("the summary", async || {
        store.audit(&AuditQuery::default()).await.unwrap().iter().any(|e| e.operation == "refusals")
    })
    .await;
    let trail: Vec<_> = store.audit(&AuditQuery::default()).await.unwrap().into_iter().filter(from_loopback).collect();
    assert_eq!(trail.len(), 4, "{trail:#?}");
    assert!(trail[..3].iter().all(|e| e.operation == "DELETE /enrollmentgroups/grp" && e.status == Some(401)));
    // 37 refusals and 263 requests turned away (260 DELETEs, the hub CONNECT, the DPS CONNECT,
    // the GET).
    let summary = trail[3].reason.as_deref().unwrap();
    assert_eq!(summary, "300 more refusals from 127.0.0.1 (263 turned away without a credential check)");

    // After the backoff, good credentials work again.
    assert!(s.service().get_enrollment_group("grp").await.is_ok());
    let (_, body) = s.register("dev-d", &primary.derive_device_key("dev-d"), None).await;
    assert_eq!(body["status"], "assigned");
}

#[tokio::test]
async fn dps_mqtt_refusals_count_per_source_too() {
    let refusals = RefusalLimits { max_failures: 5, backoff: Duration::from_secs(600), ..RefusalLimits::default() };
    let s = TestServer::start_with(move |c| c.audit.refusals = refusals).await;
    let wrong = SymmetricKey::generate();
    for i in 0..5 {
        let (topic, _) = s.register(&format!("dev-{i}"), &wrong, None).await;
        assert!(topic.contains("/401/"), "{topic}");
    }
    let (topic, _) = s.register("dev-x", &wrong, None).await;
    assert!(topic.contains("/429/"), "{topic}");
    let mut m = s.mqtt().await;
    let user = dps_username(&s.scope(), "dev-y");
    let token = device_token(&wrong, &s.scope(), "dev-y");
    // CONNECT itself is accepted (DPS reports on the first request, as the SDKs expect).
    let _ = m.connect("dev-y", &user, Some(&token), true, 60).await;
    m.subscribe_dps().await;
    m.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtMostOnce, 0, b" ").await;
    let (topic, _) = m.expect_publish().await;
    assert!(topic.starts_with("$dps/registrations/res/429/?$rid=1&retry-after="), "{topic}");
}

#[tokio::test]
async fn readyz_is_503_with_a_registry_damaged_mid_file() {
    let mut s = TestServer::start().await;
    assert_eq!(readyz(&s).await, 200);
    s.stop().await;
    let path = s.dir.path().join("fleetgate.db");
    {
        let store = fleetgate_store::SqliteStore::open(&path).unwrap();
        for i in 0..400 {
            store.set_setting(&format!("filler.{i:04}"), &"x".repeat(900)).await.unwrap();
        }
    }
    // The last connection to close checkpoints the write-ahead log into the file.
    wait_until("the WAL checkpointed", async || !path.with_extension("db-wal").exists()).await;
    let len = std::fs::metadata(&path).unwrap().len();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&vec![0xA5; 3 * 4096]).unwrap();
        f.sync_all().unwrap();
    }
    // It starts (the pages it reads at start are intact), but is not ready.
    s.server = Some(fleetgate_server::start(s.config.clone()).await.unwrap());
    wait_until("not ready with a damaged registry", async || readyz(&s).await == 503).await;
}
