//! The service APIs' queries and statistics over HTTPS, as the official SDKs and `az iot` send
//! them: DPS queries with `*` (the SDKs' default) or `SELECT … [WHERE …]`, the hub's twin query
//! `POST /devices/query` with paging, and the registry and service statistics.

mod common;

use common::TestServer;
use serde_json::{json, Value};

const DPS_V: &str = "?api-version=2021-10-01";
const HUB_V: &str = "?api-version=2021-04-12";

/// POSTs a query specification; returns status, continuation and items (empty on an error).
async fn query(
    s: &TestServer,
    path: &str,
    token: &str,
    q: Value,
    size: Option<usize>,
    cont: Option<&str>,
) -> (u16, Option<String>, Vec<Value>) {
    let mut req = s.http().post(s.url(path)).header("Authorization", token).json(&q);
    if let Some(n) = size {
        req = req.header("x-ms-max-item-count", n.to_string());
    }
    if let Some(c) = cont {
        req = req.header("x-ms-continuation", c);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let cont = resp.headers().get("x-ms-continuation").map(|v| v.to_str().unwrap().to_owned());
    let items = if status == 200 { resp.json().await.unwrap() } else { Vec::new() };
    (status, cont, items)
}

fn ids(items: &[Value], field: &str) -> Vec<String> {
    items.iter().map(|i| i[field].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn dps_queries_accept_star_select_and_where() {
    let s = TestServer::start().await;
    s.create_group("g-on", json!({})).await;
    s.create_group("g-off", json!({"provisioningStatus": "disabled"})).await;
    let t = s.service_token();
    let groups = format!("/enrollmentGroups/query{DPS_V}");
    // `*` is what the service SDKs send by default.
    let (status, _, items) = query(&s, &groups, &t, json!({"query": "*"}), None, None).await;
    assert_eq!((status, items.len()), (200, 2));
    let (_, _, items) = query(
        &s,
        &groups,
        &t,
        json!({"query": "SELECT * FROM enrollmentGroups WHERE provisioningStatus = 'disabled'"}),
        None,
        None,
    )
    .await;
    assert_eq!(ids(&items, "enrollmentGroupId"), ["g-off"]);
    let (_, _, items) = query(
        &s,
        &groups,
        &t,
        json!({"query": "SELECT * FROM enrollmentGroups WHERE attestation.type = 'x509'"}),
        None,
        None,
    )
    .await;
    assert!(items.is_empty());

    let service = s.service();
    for (id, status) in [("e1", "enabled"), ("e2", "disabled"), ("e3", "disabled")] {
        let e = json!({"registrationId": id, "attestation": {"type": "symmetricKey"}, "provisioningStatus": status});
        service.put_enrollment(&e, None).await.unwrap();
    }
    let enrollments = format!("/enrollments/query{DPS_V}");
    let (status, _, items) = query(&s, &enrollments, &t, json!({"query": "*"}), None, None).await;
    assert_eq!((status, items.len()), (200, 3));
    // The continuation counts matches: the second page starts after the first match.
    let disabled = json!({"query": "select * from enrollments where provisioningStatus = \"disabled\""});
    let (_, cont, first) = query(&s, &enrollments, &t, disabled.clone(), Some(1), None).await;
    assert_eq!(ids(&first, "registrationId"), ["e2"]);
    let (_, cont, second) = query(&s, &enrollments, &t, disabled, Some(1), cont.as_deref()).await;
    assert_eq!((ids(&second, "registrationId"), cont), (vec!["e3".to_owned()], None));

    // The WHERE forms of Azure's query language: AND / OR / NOT, parentheses, ranges, IN / NIN.
    for (q, expect) in [
        ("provisioningStatus='enabled' OR registrationId='e2'", vec!["e1", "e2"]),
        ("attestation.type='symmetricKey' AND NOT (provisioningStatus='enabled')", vec!["e2", "e3"]),
        ("registrationId > 'e1' AND registrationId <= 'e3'", vec!["e2", "e3"]),
        ("registrationId IN ['e1', 'e3']", vec!["e1", "e3"]),
        ("registrationId NIN ['e1', 'e3']", vec!["e2"]),
        ("attestation.type = 'x509' OR attestation.type = 'tpm'", Vec::<&str>::new()),
    ] {
        let q = json!({"query": format!("SELECT * FROM enrollments WHERE {q}")});
        let (status, _, items) = query(&s, &enrollments, &t, q.clone(), None, None).await;
        assert_eq!(status, 200, "{q}");
        assert_eq!(ids(&items, "registrationId"), expect, "{q}");
    }

    // Unsupported forms are refused with the reason, never answered as if unfiltered.
    for q in [
        "SELECT registrationId FROM enrollments",
        "SELECT * FROM enrollments WHERE STARTSWITH(registrationId, 'e')",
        "SELECT * FROM enrollments WHERE registrationId LIKE 'e%'",
        "SELECT * FROM enrollments WHERE (provisioningStatus = 'enabled'",
        "SELECT * FROM enrollmentGroups",
    ] {
        let resp = s.http().post(s.url(&enrollments)).header("Authorization", &t).json(&json!({"query": q}));
        let resp = resp.send().await.unwrap();
        assert_eq!(resp.status(), 400, "{q}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["errorCode"], 400004, "{q}");
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with("Unsupported query: ") || message.contains("This query is for"), "{q}: {message}");
    }
}

#[tokio::test]
async fn registration_queries_filter_with_where() {
    let s = TestServer::start().await;
    let (primary, _) = s.create_group("g1", json!({})).await;
    for reg in ["dev-a", "dev-b"] {
        s.register(reg, &primary.derive_device_key(reg), None).await;
    }
    let t = s.service_token();
    let path = format!("/registrations/g1/query{DPS_V}");
    let (status, _, items) = query(&s, &path, &t, json!({"query": "*"}), None, None).await;
    assert_eq!((status, items.len()), (200, 2));
    let q = json!({"query": "SELECT * FROM enrollmentGroups WHERE registrationId = 'dev-b'"});
    let (_, _, items) = query(&s, &path, &t, q, None, None).await;
    assert_eq!(ids(&items, "registrationId"), ["dev-b"]);
    let q = json!({"query": "SELECT * FROM enrollmentGroups WHERE status = 'assigned' AND registrationId != 'dev-a'"});
    let (_, _, items) = query(&s, &path, &t, q, None, None).await;
    assert_eq!(ids(&items, "registrationId"), ["dev-b"]);
    let q = json!({"query": "SELECT * FROM x WHERE registrationId IN ['dev-a', 'dev-c'] OR status = 'failed'"});
    let (_, _, items) = query(&s, &path, &t, q, None, None).await;
    assert_eq!(ids(&items, "registrationId"), ["dev-a"]);
    let (status, _, _) =
        query(&s, &path, &t, json!({"query": "SELECT * FROM x WHERE IS_DEFINED(a)"}), None, None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn hub_twin_query_pages_and_filters() {
    let s = TestServer::start().await;
    for i in 0..5 {
        s.create_device(&format!("d{i}")).await;
    }
    let t = s.hub_token();
    let patch = |id: &str, body: Value| {
        s.http().patch(s.url(&format!("/twins/{id}{HUB_V}"))).header("Authorization", s.hub_token()).json(&body).send()
    };
    assert_eq!(patch("d1", json!({"tags": {"site": "north"}})).await.unwrap().status(), 200);
    assert_eq!(patch("d3", json!({"tags": {"site": "north"}})).await.unwrap().status(), 200);
    assert_eq!(patch("d3", json!({"properties": {"desired": {"fw": "2.0"}}})).await.unwrap().status(), 200);
    let path = format!("/devices/query{HUB_V}");

    let mut seen = Vec::new();
    let mut cont = None;
    loop {
        let (status, next, items) =
            query(&s, &path, &t, json!({"query": "SELECT * FROM devices"}), Some(2), cont.as_deref()).await;
        assert_eq!(status, 200);
        assert!(items.len() <= 2 && items.iter().all(|i| i["etag"].is_string() && i["properties"].is_object()));
        seen.extend(ids(&items, "deviceId"));
        cont = next;
        if cont.is_none() {
            break;
        }
    }
    assert_eq!(seen, ["d0", "d1", "d2", "d3", "d4"]);

    let q = |w: &str| json!({"query": format!("SELECT * FROM devices WHERE {w}")});
    let (_, _, items) = query(&s, &path, &t, q("tags.site = 'north'"), None, None).await;
    assert_eq!(ids(&items, "deviceId"), ["d1", "d3"]);
    let (_, _, items) =
        query(&s, &path, &t, q("tags.site = 'north' AND properties.desired.fw = '2.0'"), None, None).await;
    assert_eq!(ids(&items, "deviceId"), ["d3"]);
    let (_, _, items) = query(&s, &path, &t, q("deviceId = 'd4' AND status = 'enabled'"), None, None).await;
    assert_eq!(ids(&items, "deviceId"), ["d4"]);
    let (_, _, items) = query(&s, &path, &t, q("properties.reported.fw = '1.0'"), None, None).await;
    assert!(items.is_empty());
    // OR, as IoT Hub's query language documents it (the parser is shared with DPS).
    let (_, _, items) = query(&s, &path, &t, q("tags.site = 'north' OR deviceId = 'd0'"), None, None).await;
    assert_eq!(ids(&items, "deviceId"), ["d0", "d1", "d3"]);
    for bad in [
        json!({"query": "SELECT * FROM devices WHERE STARTSWITH(deviceId, 'd')"}),
        json!({"query": "SELECT COUNT() AS n FROM devices"}),
        json!({"query": "SELECT * FROM devices.modules"}),
        json!({"query": "*"}),
        json!({}),
    ] {
        let (status, _, _) = query(&s, &path, &t, bad.clone(), None, None).await;
        assert_eq!(status, 400, "{bad}");
    }
}

#[tokio::test]
async fn registry_and_service_statistics() {
    let s = TestServer::start().await;
    let get = |path: &str| {
        let req = s.http().get(s.url(&format!("{path}{HUB_V}"))).header("Authorization", s.hub_token());
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    assert_eq!(
        get("/statistics/devices").await,
        json!({"totalDeviceCount": 0, "enabledDeviceCount": 0, "disabledDeviceCount": 0})
    );
    let key = s.create_device("d1").await;
    s.create_device("d2").await;
    let off = s
        .http()
        .put(s.url(&format!("/devices/d2{HUB_V}")))
        .header("Authorization", s.hub_token())
        .header("If-Match", "*")
        .json(&json!({"deviceId": "d2", "status": "disabled"}))
        .send()
        .await
        .unwrap();
    assert_eq!(off.status(), 200);
    assert_eq!(
        get("/statistics/devices").await,
        json!({"totalDeviceCount": 2, "enabledDeviceCount": 1, "disabledDeviceCount": 1})
    );
    assert_eq!(get("/statistics/service").await, json!({"connectedDeviceCount": 0}));
    let _device = s.hub_device("d1", &key).await.expect("d1 connects");
    assert_eq!(get("/Statistics/Service/").await, json!({"connectedDeviceCount": 1}));
}
