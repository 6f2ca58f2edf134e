//! DPS beyond the tutorial: individual enrollments, allocation policies across hubs,
//! reprovisioning, custom allocation webhooks, key rolling.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_store::DeviceRegistry;
use serde_json::{json, Value};

#[tokio::test]
async fn an_individual_enrollment_takes_precedence_over_a_group() {
    let s = TestServer::start().await;
    let (group_key, _) = s.create_group("grp", json!({})).await;
    let e = s
        .service()
        .put_enrollment(
            &json!({"registrationId": "dev-x", "deviceId": "custom-dev", "attestation": {"type": "symmetricKey"},
                    "initialTwin": {"properties": {"desired": {"mode": "solo"}}}}),
            None,
        )
        .await
        .unwrap();
    let own = SymmetricKey::from_base64(e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();

    // The group-derived key no longer opens registration for this id.
    let (topic, body) = s.register("dev-x", &group_key.derive_device_key("dev-x"), None).await;
    assert!(topic.contains("/401/"), "{topic} {body}");
    // The enrollment's own key does, with its device id and an empty symmetricKey attestation.
    let (topic, body) = s.register("dev-x", &own, None).await;
    assert!(topic.contains("/200/"), "{topic} {body}");
    let st = &body["registrationState"];
    assert_eq!(st["deviceId"], "custom-dev");
    assert_eq!(st["symmetricKey"], json!({}));
    // The hub identity uses the enrollment's keys, with its initial twin.
    let (dev, twin) = s.store().twin(&s.hub(), "custom-dev").await.unwrap().unwrap();
    assert_eq!(dev.primary_key, own.to_base64());
    assert_eq!(twin.desired["mode"], "solo");
    // GET shows the registration state; the key stays hidden.
    let got = s.service().get_enrollment("DEV-X").await.unwrap();
    assert_eq!(got["registrationState"]["assignedHub"], s.hub());
    assert_eq!(got["attestation"]["symmetricKey"], json!({}));

    // Disabling the individual enrollment stops the device.
    let mut upd = got.clone();
    upd.as_object_mut().unwrap().remove("registrationState");
    upd["provisioningStatus"] = "disabled".into();
    s.service().put_enrollment(&upd, Some("*")).await.unwrap();
    let (_, body) = s.register("dev-x", &own, None).await;
    assert_eq!(body["status"], "disabled");
}

/// Which registration ids have an individual enrollment is kept in memory once a device has
/// registered; an enrollment added or deleted afterwards must still take effect at once.
#[tokio::test]
async fn individual_enrollments_added_or_deleted_later_take_effect_at_once() {
    let s = TestServer::start().await;
    let (group_key, _) = s.create_group("grp", json!({})).await;
    let derived = group_key.derive_device_key("dev-y");
    let (topic, body) = s.register("dev-y", &derived, None).await;
    assert!(topic.contains("/200/"), "{topic} {body}");

    let e = s
        .service()
        .put_enrollment(&json!({"registrationId": "DEV-Y", "attestation": {"type": "symmetricKey"}}), None)
        .await
        .unwrap();
    let own = SymmetricKey::from_base64(e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();
    let (topic, body) = s.register("dev-y", &derived, None).await;
    assert!(topic.contains("/401/"), "the new individual enrollment takes precedence: {topic} {body}");
    let (topic, body) = s.register("dev-y", &own, None).await;
    assert!(topic.contains("/200/"), "{topic} {body}");

    s.service().delete_enrollment("dev-y", None).await.unwrap();
    let (topic, body) = s.register("dev-y", &own, None).await;
    assert!(topic.contains("/401/"), "the deleted enrollment's key no longer works: {topic} {body}");
    let (topic, body) = s.register("dev-y", &derived, None).await;
    assert!(topic.contains("/200/"), "the group applies again: {topic} {body}");
}

#[tokio::test]
async fn bulk_enrollment_operations_report_each_failure() {
    let s = TestServer::start().await;
    let svc = s.service();
    let e = |id: &str| json!({"registrationId": id, "attestation": {"type": "symmetricKey"}});
    let r = svc.bulk_enrollments("create", vec![e("a"), e("b")]).await.unwrap();
    assert_eq!(r, json!({"isSuccessful": true, "errors": []}));
    let r = svc.bulk_enrollments("create", vec![e("b"), e("c"), e("bad id!")]).await.unwrap();
    assert_eq!(r["isSuccessful"], false);
    let failed: Vec<_> =
        r["errors"].as_array().unwrap().iter().map(|x| (x["registrationId"].clone(), x["errorCode"].clone())).collect();
    assert_eq!(failed, vec![(json!("b"), json!(409201)), (json!("bad id!"), json!(400005))]);
    let r = svc.bulk_enrollments("updateIfMatchETag", vec![e("a")]).await.unwrap();
    assert_eq!(r["errors"][0]["errorCode"], 412002, "no etag, no update");
    let r = svc.bulk_enrollments("delete", vec![e("a"), e("zzz")]).await.unwrap();
    assert_eq!(r["errors"][0]["registrationId"], "zzz");
    let ids: Vec<_> = svc
        .list_enrollments()
        .await
        .unwrap()
        .iter()
        .map(|x| x["registrationId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["b", "c"]);
    let too_many: Vec<_> = (0..11).map(|i| e(&format!("d{i}"))).collect();
    assert_eq!(svc.bulk_enrollments("create", too_many).await.unwrap_err().status(), Some(400));
}

#[tokio::test]
async fn hashed_allocation_follows_hub_weights() {
    let s = TestServer::start().await;
    s.add_hub("hub-b", 1).await;
    s.add_hub("hub-c", 2).await;
    let (primary, _) = s.create_group("grp", json!({"allocationPolicy": "hashed"})).await;
    let mut counts = std::collections::HashMap::<String, u32>::new();
    for i in 0..200 {
        let reg = format!("dev-{i}");
        let (_, body) = s.register(&reg, &primary.derive_device_key(&reg), None).await;
        *counts.entry(body["registrationState"]["assignedHub"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    // 1:1:2 over 200 devices.
    for (hub, expect) in [(s.hub(), 50.0), ("hub-b".to_owned(), 50.0), ("hub-c".to_owned(), 100.0)] {
        let got = f64::from(*counts.get(&hub).unwrap_or(&0));
        assert!((got - expect).abs() / expect <= 0.25, "{counts:?}");
    }
}

async fn reported(s: &TestServer, hub: &str, dev: &str) -> Option<Value> {
    s.store().twin(hub, dev).await.unwrap().map(|(_, t)| Value::Object(t.reported))
}

/// The device data on `hub`: (reported `fw` present, desired `v`).
async fn data(s: &TestServer, hub: &str, dev: &str) -> Option<(bool, Value)> {
    let (_, t) = s.store().twin(hub, dev).await.unwrap()?;
    Some((t.reported.contains_key("fw"), t.desired.get("v").cloned().unwrap_or(Value::Null)))
}

/// Azure's reprovisioning semantics for every policy combination, re-registering to the same hub
/// and to another (docs: "IoT Hub Device reprovisioning concepts"; the C# SDK's reprovisioning
/// E2E tests): `updateHubAssignment` false never moves the device and keeps its data;
/// `migrateDeviceData` false resets the data to the enrollment's initial twin (on the same hub
/// too: the "factory reset") and reports `deviceDataReset`; a move removes the identity from the
/// hub it leaves in the same commit.
#[tokio::test]
async fn reprovisioning_policies_for_each_combination_and_hub() {
    let s = TestServer::start().await;
    s.add_hub("hub-b", 1).await;
    let a = s.hub();
    // (updateHubAssignment, migrateDeviceData, re-register to hub B, hub after, substatus, data kept)
    let cases = [
        (false, false, false, "a", "initialAssignment", true),
        (false, false, true, "a", "initialAssignment", true),
        (false, true, true, "a", "initialAssignment", true),
        (true, true, false, "a", "initialAssignment", true),
        (true, false, false, "a", "deviceDataReset", false),
        (true, true, true, "hub-b", "deviceDataMigrated", true),
        (true, false, true, "hub-b", "deviceDataReset", false),
    ];
    for (i, (update, migrate, to_b, hub_after, substatus, kept)) in cases.into_iter().enumerate() {
        let case = format!("update {update}, migrate {migrate}, to hub B {to_b}");
        let (group, dev) = (format!("grp-{i}"), format!("dev-{i}"));
        let policy = json!({"updateHubAssignment": update, "migrateDeviceData": migrate});
        let (primary, _) = s
            .create_group(
                &group,
                json!({"iotHubHostName": a, "allocationPolicy": "static", "reprovisionPolicy": policy,
                       "initialTwin": {"properties": {"desired": {"v": 1}}}}),
            )
            .await;
        let key = primary.derive_device_key(&dev);
        let (_, body) = s.register(&dev, &key, None).await;
        assert_eq!(body["registrationState"]["assignedHub"], a);
        assert_eq!(body["registrationState"]["substatus"], "initialAssignment");
        // The device reports on hub A, and the solution changes a desired property there.
        s.store()
            .update_device(
                &a,
                &dev,
                Box::new(|cur| {
                    let (d, mut t) = cur.unwrap();
                    t.reported.insert("fw".into(), json!("1.2"));
                    t.desired.insert("v".into(), json!(2));
                    Ok(Some((d, t)))
                }),
            )
            .await
            .unwrap();
        if to_b {
            let mut g = s.service().get_enrollment_group(&group).await.unwrap();
            g["iotHubHostName"] = "hub-b".into();
            s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
        }
        let (_, body) = s.register(&dev, &key, None).await;
        let st = &body["registrationState"];
        let hub_after = if hub_after == "a" { a.clone() } else { hub_after.to_owned() };
        assert_eq!(st["assignedHub"], hub_after, "{case}: {body}");
        assert_eq!(st["substatus"], substatus, "{case}: {body}");
        let expected = if kept { (true, json!(2)) } else { (false, json!(1)) };
        assert_eq!(data(&s, &hub_after, &dev).await, Some(expected), "{case}");
        if hub_after != a {
            assert!(s.store().device(&a, &dev).await.unwrap().is_none(), "{case}: the identity left hub A");
        }
        let record = s.service().get_registration(&dev).await.unwrap();
        assert_eq!(record["substatus"], substatus, "{case}");
    }
}

/// `reprovisionedToInitialAssignment` is for a first assignment (as far as DPS knows) to a hub
/// that already has the identity (the C# SDK's substatus documentation); moving back to the hub
/// of the first assignment is an ordinary move.
#[tokio::test]
async fn reprovisioned_to_initial_assignment_is_for_an_identity_dps_did_not_know() {
    let s = TestServer::start().await;
    s.add_hub("hub-b", 1).await;
    let a = s.hub();
    let (primary, _) = s.create_group("grp", json!({"iotHubHostName": a, "allocationPolicy": "static"})).await;
    let key = primary.derive_device_key("dev-1");
    s.register("dev-1", &key, None).await;
    let mut g = s.service().get_enrollment_group("grp").await.unwrap();
    g["iotHubHostName"] = "hub-b".into();
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    let (_, body) = s.register("dev-1", &key, None).await;
    assert_eq!(body["registrationState"]["substatus"], "deviceDataMigrated");
    g["iotHubHostName"] = a.clone().into();
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    let (_, body) = s.register("dev-1", &key, None).await;
    assert_eq!(body["registrationState"]["assignedHub"], a);
    assert_eq!(body["registrationState"]["substatus"], "deviceDataMigrated", "{body}");
    assert!(s.store().device("hub-b", "dev-1").await.unwrap().is_none());

    // The operator deletes the registration record; the identity stays on hub A. A device on API
    // 2019-04-15 or later (here over HTTPS, as the C# SDK's 2021-06-01) is told
    // `reprovisionedToInitialAssignment`; an older one (the Python SDK's 2019-03-31 over MQTT)
    // `initialAssignment`, as Azure answers each.
    s.service().delete_registration("dev-1").await.unwrap();
    let url = s.url(&format!("/{}/registrations/dev-1/register?api-version=2021-06-01", s.scope()));
    let token = common::device_token(&key, &s.scope(), "dev-1");
    let resp = s.http().put(&url).header("authorization", &token).json(&json!({"registrationId": "dev-1"}));
    let body: Value = resp.send().await.unwrap().json().await.unwrap();
    assert_eq!(body["registrationState"]["substatus"], "reprovisionedToInitialAssignment", "{body}");
    s.service().delete_registration("dev-1").await.unwrap();
    let (_, body) = s.register("dev-1", &key, None).await;
    assert_eq!(body["registrationState"]["substatus"], "initialAssignment", "{body}");
    // A device new to both is an initial assignment.
    let (_, body) = s.register("dev-2", &primary.derive_device_key("dev-2"), None).await;
    assert_eq!(body["registrationState"]["substatus"], "initialAssignment");
}

/// A registration refused because the enrollment (individual or group) is disabled leaves the
/// registration record saying `disabled`, as Azure's does, not the assignment it had; enabled
/// again, the device keeps its hub and data.
#[tokio::test]
async fn a_disabled_enrollment_shows_in_the_registration_record() {
    let s = TestServer::start().await;
    let hub = s.hub();
    let (primary, _) = s.create_group("grp", json!({"initialTwin": {"properties": {"desired": {"v": 1}}}})).await;
    let group_key = primary.derive_device_key("dev-g");
    let e = s
        .service()
        .put_enrollment(&json!({"registrationId": "dev-i", "attestation": {"type": "symmetricKey"}}), None)
        .await
        .unwrap();
    let own = SymmetricKey::from_base64(e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();
    for (reg, key) in [("dev-g", &group_key), ("dev-i", &own)] {
        let (_, body) = s.register(reg, key, None).await;
        assert_eq!(body["status"], "assigned", "{reg}");
    }
    s.store()
        .update_device(
            &hub,
            "dev-g",
            Box::new(|cur| {
                let (d, mut t) = cur.unwrap();
                t.reported.insert("fw".into(), json!("1.2"));
                Ok(Some((d, t)))
            }),
        )
        .await
        .unwrap();

    let mut g = s.service().get_enrollment_group("grp").await.unwrap();
    g["provisioningStatus"] = "disabled".into();
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    let mut ie = s.service().get_enrollment("dev-i").await.unwrap();
    ie.as_object_mut().unwrap().remove("registrationState");
    ie["provisioningStatus"] = "disabled".into();
    s.service().put_enrollment(&ie, Some("*")).await.unwrap();
    for (reg, key) in [("dev-g", &group_key), ("dev-i", &own)] {
        let (_, body) = s.register(reg, key, None).await;
        assert_eq!(body["status"], "disabled", "{reg}: {body}");
        let record = s.service().get_registration(reg).await.unwrap();
        assert_eq!(record["status"], "disabled", "{reg}: {record}");
    }
    let got = s.service().get_enrollment("dev-i").await.unwrap();
    assert_eq!(got["registrationState"]["status"], "disabled");

    // Enabled again: the same hub, the data the device had.
    g = s.service().get_enrollment_group("grp").await.unwrap();
    g["provisioningStatus"] = "enabled".into();
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    let (_, body) = s.register("dev-g", &group_key, None).await;
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["assignedHub"], hub);
    assert_eq!(reported(&s, &hub, "dev-g").await.unwrap()["fw"], "1.2");
}

/// A tiny allocation webhook: routes by the device payload's `tier`, echoes a payload back, and
/// can be told to misbehave.
async fn webhook() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    use axum::routing::post;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/alloc",
        post(move |axum::Json(req): axum::Json<Value>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(req.clone());
                let tier = req["deviceRuntimeContext"]["payload"]["tier"].as_str().unwrap_or("").to_owned();
                match tier.as_str() {
                    "slow" => {
                        // A webhook that deliberately stalls, past the server's call timeout.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        (axum::http::StatusCode::OK, axum::Json(json!({"iotHubHostName": "hub-b"})))
                    }
                    "broken" => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({}))),
                    "rogue" => (axum::http::StatusCode::OK, axum::Json(json!({"iotHubHostName": "elsewhere.example"}))),
                    t => {
                        // Gold devices go to hub-b, everyone else to the other linked hub.
                        let others: Vec<String> = req["linkedHubs"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter_map(|h| h.as_str().filter(|h| *h != "hub-b").map(str::to_owned))
                            .collect();
                        let hub = if t == "gold" { "hub-b".to_owned() } else { others[0].clone() };
                        (
                            axum::http::StatusCode::OK,
                            axum::Json(json!({"iotHubHostName": hub, "payload": {"routedBy": "webhook", "tier": t},
                                              "initialTwin": {"tags": {"tier": t}}})),
                        )
                    }
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alloc?code=secret", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, seen)
}

#[tokio::test]
async fn custom_allocation_webhook_routes_by_payload_and_fails_clearly() {
    let s = TestServer::start_with(|c| c.webhook_timeout = Duration::from_millis(800)).await;
    s.add_hub("hub-b", 1).await;
    let (url, seen) = webhook().await;
    let (primary, _) = s
        .create_group("grp", json!({"allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}}))
        .await;

    let (topic, body) =
        s.register("dev-gold", &primary.derive_device_key("dev-gold"), Some(json!({"tier": "gold"}))).await;
    assert!(topic.contains("/200/"), "{topic}");
    let st = &body["registrationState"];
    assert_eq!(st["assignedHub"], "hub-b");
    assert_eq!(st["payload"], json!({"routedBy": "webhook", "tier": "gold"}));
    let (_, twin) = s.store().twin("hub-b", "dev-gold").await.unwrap().unwrap();
    assert_eq!(twin.tags["tier"], "gold", "the webhook's initial twin applies");
    {
        let req = &seen.lock().unwrap()[0];
        assert_eq!(req["deviceRuntimeContext"]["registrationId"], "dev-gold");
        assert_eq!(req["enrollmentGroup"]["enrollmentGroupId"], "grp");
        assert_eq!(req["enrollmentGroup"]["attestation"]["symmetricKey"], json!({}), "keys never leave");
        assert_eq!(req["linkedHubs"].as_array().unwrap().len(), 2);
    }
    let (_, body) =
        s.register("dev-plain", &primary.derive_device_key("dev-plain"), Some(json!({"tier": "basic"}))).await;
    assert_eq!(body["registrationState"]["assignedHub"], s.hub());

    for (dev, tier, code) in
        [("dev-slow", "slow", 400210), ("dev-broken", "broken", 400210), ("dev-rogue", "rogue", 400209)]
    {
        let (topic, body) = s.register(dev, &primary.derive_device_key(dev), Some(json!({"tier": tier}))).await;
        assert!(topic.contains("/200/"), "{topic}");
        assert_eq!(body["status"], "failed", "{dev}: {body}");
        assert_eq!(body["registrationState"]["errorCode"], code, "{dev}");
        let rec = s.service().get_registration(dev).await.unwrap();
        assert_eq!(rec["status"], "failed");
        assert!(rec["errorMessage"].as_str().unwrap().len() > 10, "the record says why: {rec}");
    }
}

#[tokio::test]
async fn a_webhook_that_is_down_fails_the_registration() {
    let s = TestServer::start().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alloc", dead.local_addr().unwrap());
    drop(dead);
    let (primary, _) = s
        .create_group("grp", json!({"allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}}))
        .await;
    let (_, body) = s.register("dev-1", &primary.derive_device_key("dev-1"), None).await;
    assert_eq!(body["status"], "failed");
    assert_eq!(body["registrationState"]["errorCode"], 400210);
    assert!(s.store().device(&s.hub(), "dev-1").await.unwrap().is_none());
}

#[tokio::test]
async fn rolled_keys_keep_old_devices_working_while_the_old_key_is_secondary() {
    let s = TestServer::start().await;
    let (old_primary, _) = s.create_group("grp", json!({})).await;
    let new_primary = SymmetricKey::generate();
    let mut g = s.service().get_enrollment_group("grp").await.unwrap();
    g["attestation"] = json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": new_primary.to_base64(), "secondaryKey": old_primary.to_base64()}});
    s.service().put_enrollment_group(&g, Some("*")).await.unwrap();
    for key in [old_primary.derive_device_key("dev-1"), new_primary.derive_device_key("dev-1")] {
        let (_, body) = s.register("dev-1", &key, None).await;
        assert_eq!(body["status"], "assigned");
    }
    // The hub identity follows the roll: both current derived keys authenticate there.
    let dev = s.store().device(&s.hub(), "dev-1").await.unwrap().unwrap();
    assert_eq!(dev.primary_key, new_primary.derive_device_key("dev-1").to_base64());
    assert_eq!(dev.secondary_key, old_primary.derive_device_key("dev-1").to_base64());
    // A third key, never in the group, is refused.
    let (topic, _) = s.register("dev-1", &SymmetricKey::generate().derive_device_key("dev-1"), None).await;
    assert!(topic.contains("/401/"));
}
