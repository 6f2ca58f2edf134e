//! The admin routes of the service API (`/linkedHubs`, `/policies`, `/audit`): the one path that
//! changes hubs and policies, which the server therefore keeps in memory. A change made through
//! it must be in force for the very next registration, connect or call (the copy dropped), and
//! `instance.json` must follow before the answer.

mod common;

use common::TestServer;
use fleetgate_client::{ConnectionString, ServiceError};
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use serde_json::{json, Value};

fn status(e: ServiceError) -> Option<u16> {
    e.status()
}

async fn assigned_hub(s: &TestServer, group_key: &fleetgate_core::keys::SymmetricKey, reg: &str) -> String {
    let (topic, body) = s.register(reg, &group_key.derive_device_key(reg), None).await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "{topic} {body}");
    body["registrationState"]["assignedHub"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn linked_hub_changes_reach_the_next_registration() {
    let s = TestServer::start().await;
    let svc = s.service();
    let (primary, _) = s.create_group("grp", json!({"allocationPolicy": "hashed"})).await;
    let first = s.hub();
    // Loads the hubs into memory.
    assert_eq!(assigned_hub(&s, &primary, "dev-0").await, first);

    // Link hub-b and take the first hub out of allocation: the next device must go to hub-b.
    let hub = svc.put_linked_hub("hub-b", &json!({}), false).await.unwrap();
    assert_eq!(hub["name"], "hub-b");
    svc.put_linked_hub(&first, &json!({"applyAllocationPolicy": false}), true).await.unwrap();
    assert_eq!(assigned_hub(&s, &primary, "dev-1").await, "hub-b");

    // And back.
    svc.put_linked_hub(&first, &json!({"applyAllocationPolicy": true}), true).await.unwrap();
    svc.put_linked_hub("hub-b", &json!({"applyAllocationPolicy": false}), true).await.unwrap();
    assert_eq!(assigned_hub(&s, &primary, "dev-2").await, first);

    let list = svc.list_linked_hubs().await.unwrap();
    let b = list.iter().find(|h| h["name"] == "hub-b").expect("hub-b listed");
    assert_eq!(b, &json!({"name": "hub-b", "allocationWeight": 1, "applyAllocationPolicy": false, "latencyMs": 0}));
    assert!(list.iter().all(|h| h.get("connectionString").is_none()), "a listing shows no keys: {list:?}");
}

#[tokio::test]
async fn a_linked_hub_serves_at_once_and_stops_at_once_when_unlinked() {
    let s = TestServer::start().await;
    let svc = s.service();
    // The hub service API has read the instance's hubs and policies once already.
    assert!(s.hub_get("/devices").await.is_array());

    let hub = svc.put_linked_hub("hub-b", &json!({"allocationWeight": 3}), false).await.unwrap();
    let conn: ConnectionString = hub["connectionString"].as_str().unwrap().parse().unwrap();
    assert_eq!(conn.host_name, format!("hub-b:{}", s.https_addr().port()), "the port the call came in on");
    let token = build_token(&conn.key, &conn.host_name, Timestamp::now().unix_seconds() + 600, Some(&conn.key_name));
    let devices =
        |token: String| s.http().get(s.url("/devices?api-version=2021-04-12")).header("Authorization", token).send();
    assert_eq!(devices(token.clone()).await.unwrap().status(), 200, "the new hub's owner key works at once");
    let inst = fleetgate_server::Instance::read(s.dir.path()).unwrap();
    let listed = inst.hubs.iter().find(|h| h.host_name == "hub-b").expect("instance.json lists the new hub");
    assert!(listed.connection_string.ends_with(&conn.key.to_base64()), "{listed:?}");

    // Its key renewed: the old one is refused at the next call.
    let renewed = svc.renew_policy_key(Some("HUB-B"), "iothubowner", false).await.unwrap();
    assert_ne!(renewed["primaryKey"].as_str().unwrap(), conn.key.to_base64());
    assert_eq!(devices(token.clone()).await.unwrap().status(), 401, "a renewed key is out at once");

    svc.delete_linked_hub("hub-b").await.unwrap();
    let key = fleetgate_core::keys::SymmetricKey::from_base64(renewed["primaryKey"].as_str().unwrap()).unwrap();
    let token = build_token(&key, &conn.host_name, Timestamp::now().unix_seconds() + 600, Some("iothubowner"));
    assert_eq!(devices(token).await.unwrap().status(), 401, "an unlinked hub is not served");
    let inst = fleetgate_server::Instance::read(s.dir.path()).unwrap();
    assert!(inst.hubs.iter().all(|h| h.host_name != "hub-b"), "instance.json follows: {inst:?}");
}

#[tokio::test]
async fn admin_refusals_say_why() {
    let s = TestServer::start().await;
    let svc = s.service();
    let only = s.hub();
    let e = svc.delete_linked_hub(&only).await.unwrap_err();
    assert_eq!(status(e), Some(409));
    assert_eq!(status(svc.delete_linked_hub("nowhere.test").await.unwrap_err()), Some(404));
    // An update (If-Match) never links a hub.
    assert_eq!(status(svc.put_linked_hub("nowhere.test", &json!({}), true).await.unwrap_err()), Some(404));
    assert!(svc.list_linked_hubs().await.unwrap().iter().all(|h| h["name"] != "nowhere.test"));
    assert_eq!(status(svc.put_linked_hub("a b", &json!({}), false).await.unwrap_err()), Some(400));
    let bad = svc.put_linked_hub("hub-b", &json!({"allocationWeight": "heavy"}), false).await.unwrap_err();
    assert_eq!(status(bad), Some(400));
    assert_eq!(status(svc.renew_policy_key(None, "nosuchpolicy", false).await.unwrap_err()), Some(404));
    assert_eq!(status(svc.list_policies(Some("nowhere.test")).await.unwrap_err()), Some(404));

    // A hub with device identities stays linked.
    svc.put_linked_hub("hub-b", &json!({}), false).await.unwrap();
    s.create_device("dev-1").await;
    let e = svc.delete_linked_hub(&only).await.unwrap_err();
    let api = e.api_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(api.status, 409);
    let body = &api.body;
    assert!(body["message"].as_str().unwrap().contains("has 1 device identities"), "{body}");
}

#[tokio::test]
async fn the_audit_trail_is_read_through_the_api() {
    let s = TestServer::start().await;
    let svc = s.service();
    svc.put_linked_hub("hub-b", &json!({}), false).await.unwrap();
    // Read at once: the entry recorded before the call is in the answer.
    let entries = svc.audit(None, Some("hub-b"), Some("success"), 0).await.unwrap();
    let ops: Vec<&str> = entries.iter().filter_map(|e| e["operation"].as_str()).collect();
    assert_eq!(ops, ["PUT /linkedhubs/hub-b"], "{entries:?}");
    assert_eq!(entries[0]["actor"], "provisioningserviceowner");
    let future = Timestamp::from_unix_seconds(Timestamp::now().unix_seconds() + 3600).to_azure_string();
    assert_eq!(svc.audit(Some(&future), None, None, 0).await.unwrap(), Vec::<Value>::new());
    assert_eq!(status(svc.audit(Some("yesterday"), None, None, 0).await.unwrap_err()), Some(400));
}
