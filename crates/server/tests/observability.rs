//! What an operator sees: the audit trail, /metrics, /healthz and /readyz.

mod common;

use common::{device_token, TestServer};
use fleetgate_core::audit::{AuditCategory, AuditQuery, Outcome};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_store::AuditSink;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use serde_json::json;

/// The entries about `id` once one satisfies `want` (the trail is written in the background).
async fn audit_until(
    s: &TestServer,
    id: &str,
    want: impl Fn(&fleetgate_core::audit::AuditEntry) -> bool,
) -> Vec<fleetgate_core::audit::AuditEntry> {
    let mut last = Vec::new();
    for _ in 0..60 {
        last = s.store().audit(&AuditQuery { id: Some(id.into()), ..Default::default() }).await.unwrap();
        if last.iter().any(&want) {
            return last;
        }
        // Backoff between polls.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no matching audit entry for {id}: {last:?}");
}

#[tokio::test]
async fn failed_attestations_and_service_changes_are_audited_without_secrets() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("grp-a", json!({})).await;
    let wrong = SymmetricKey::generate();
    let token = device_token(&wrong, &s.scope(), "dev-bad");
    let (topic, _) = s.register("dev-bad", &wrong, None).await;
    assert!(topic.contains("/401/"));
    let entries = audit_until(&s, "dev-bad", |e| e.operation == "attest").await;
    let e = entries.iter().find(|e| e.operation == "attest").expect("an attest entry");
    assert_eq!((e.category, e.outcome, e.status), (AuditCategory::DeviceOperations, Outcome::Failure, Some(401)));
    assert!(e.reason.as_deref().unwrap().contains("no enrollment group key matches"));
    let json = serde_json::to_string(&entries).unwrap();
    assert!(!json.contains(&wrong.to_base64()) && !json.contains(&token[30..60]), "no key or signature in the trail");

    let (_, body) = s.register("dev-ok", &primary.derive_device_key("dev-ok"), None).await;
    assert_eq!(body["status"], "assigned");
    audit_until(&s, "dev-ok", |e| e.operation == "register" && e.outcome == Outcome::Success).await;

    // The group's creation is a service operation by the owner policy.
    let g = audit_until(&s, "grp-a", |e| e.category == AuditCategory::ServiceOperations).await;
    let e = g.iter().find(|e| e.category == AuditCategory::ServiceOperations).expect("a service entry");
    assert_eq!(e.actor, "provisioningserviceowner");
    assert!(e.operation.starts_with("PUT /enrollmentgroups/grp-a"));
    assert_eq!(e.outcome, Outcome::Success);

    // A refused hub connection too.
    s.create_device("dev-h").await;
    assert!(s.hub_device("dev-h", &wrong).await.is_err());
    audit_until(&s, "dev-h", |e| e.operation == "connect" && e.outcome == Outcome::Failure).await;
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let s = TestServer::start().await;
    let http = s.http();
    assert_eq!(http.get(s.url("/healthz")).send().await.unwrap().text().await.unwrap(), "ok");
    assert_eq!(http.get(s.url("/readyz")).send().await.unwrap().status(), 200);
    let (primary, _) = s.create_group("grp", json!({})).await;
    let (_, body) = s.register("dev-m", &primary.derive_device_key("dev-m"), None).await;
    assert_eq!(body["status"], "assigned");
    let key = s.create_device("dev-t").await;
    let mut m = s.hub_device("dev-t", &key).await.unwrap();
    m.publish("devices/dev-t/messages/events/", QoS::AtLeastOnce, 1, b"x").await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let metrics = http.get(s.url("/metrics")).header("authorization", s.service_token()).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    for needle in [
        "fleetgate_registrations_total{outcome=\"assigned\"}",
        "fleetgate_registration_seconds_bucket",
        "fleetgate_connections{listener=\"mqtt\"}",
        "fleetgate_connections{listener=\"https\"}",
        "fleetgate_messages_total",
        "fleetgate_hub_sessions",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}
