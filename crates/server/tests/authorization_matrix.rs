//! Authorization as a matrix: every route of both service APIs × every method × every policy,
//! with ids equal to every route word. The rights are decided by the route a request matched and
//! its method — an id such as `query` or `attestationmechanism` must not turn a write into a read.
//!
//! The expectations below are written out by hand from Azure's policy rights, independently of
//! the servers' tables, so a wrong table entry fails here.

mod common;

use common::TestServer;
use fleetgate_core::audit::{AuditCategory, AuditQuery, Outcome};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::policy::AccessPolicy;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use fleetgate_store::{AuditSink, DeviceRegistry, EnrollmentStore, InstanceStore};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

const DPS_OWNER: &str = "provisioningserviceowner";
const ENROLLMENT_READERS: &[&str] = &[DPS_OWNER, "enrollmentread", "enrollmentwrite"];
const ENROLLMENT_WRITERS: &[&str] = &[DPS_OWNER, "enrollmentwrite"];
const REGISTRATION_READERS: &[&str] = &[DPS_OWNER, "registrationstatusread", "registrationstatuswrite"];
const REGISTRATION_WRITERS: &[&str] = &[DPS_OWNER, "registrationstatuswrite"];
/// The instance's configuration (Azure's control plane): `ServiceConfig`, the owner's alone.
const CONFIG: &[&str] = &[DPS_OWNER];

/// (method, route template, the DPS policies allowed to call it)
const DPS_ROUTES: &[(&str, &str, &[&str])] = &[
    ("POST", "/enrollmentgroups/query", ENROLLMENT_READERS),
    ("PUT", "/enrollmentgroups/{id}", ENROLLMENT_WRITERS),
    ("GET", "/enrollmentgroups/{id}", ENROLLMENT_READERS),
    ("DELETE", "/enrollmentgroups/{id}", ENROLLMENT_WRITERS),
    ("POST", "/enrollmentgroups/{id}/attestationmechanism", ENROLLMENT_READERS),
    ("POST", "/enrollments", ENROLLMENT_WRITERS),
    ("POST", "/enrollments/query", ENROLLMENT_READERS),
    ("PUT", "/enrollments/{id}", ENROLLMENT_WRITERS),
    ("GET", "/enrollments/{id}", ENROLLMENT_READERS),
    ("DELETE", "/enrollments/{id}", ENROLLMENT_WRITERS),
    ("POST", "/enrollments/{id}/attestationmechanism", ENROLLMENT_READERS),
    ("GET", "/registrations/{id}", REGISTRATION_READERS),
    ("DELETE", "/registrations/{id}", REGISTRATION_WRITERS),
    ("POST", "/registrations/{id}/query", REGISTRATION_READERS),
    ("GET", "/linkedhubs", CONFIG),
    ("PUT", "/linkedhubs/{id}", CONFIG),
    ("DELETE", "/linkedhubs/{id}", CONFIG),
    ("GET", "/policies", CONFIG),
    ("POST", "/policies/{id}/renewkey", CONFIG),
    ("GET", "/audit", CONFIG),
];

const REGISTRY_READERS: &[&str] = &["iothubowner", "registryRead", "registryReadWrite"];
const REGISTRY_WRITERS: &[&str] = &["iothubowner", "registryReadWrite"];
const SERVICE: &[&str] = &["iothubowner", "service"];
const TWIN_READERS: &[&str] = &["iothubowner", "service", "registryRead", "registryReadWrite"];
/// Device-facing routes: the device's own credentials, or a policy with `DeviceConnect` acting
/// for it (Azure's `iothubowner` and `device`).
const DEVICE: &[&str] = &["iothubowner", "device"];

const HUB_ROUTES: &[(&str, &str, &[&str])] = &[
    ("GET", "/devices", REGISTRY_READERS),
    ("POST", "/devices/query", TWIN_READERS),
    ("GET", "/statistics/devices", REGISTRY_READERS),
    ("GET", "/statistics/service", SERVICE),
    ("PUT", "/devices/{id}", REGISTRY_WRITERS),
    ("GET", "/devices/{id}", REGISTRY_READERS),
    ("DELETE", "/devices/{id}", REGISTRY_WRITERS),
    ("POST", "/devices/{id}/messages/devicebound", SERVICE),
    // Purge and feedback (the lock token in the `{id}` place): service connect, as in Azure.
    ("DELETE", "/devices/{id}/commands", SERVICE),
    ("GET", "/messages/servicebound/feedback", SERVICE),
    ("DELETE", "/messages/servicebound/feedback/{id}", SERVICE),
    ("POST", "/messages/servicebound/feedback/{id}/abandon", SERVICE),
    ("GET", "/devices/{id}/messages/devicebound", DEVICE),
    ("DELETE", "/devices/{id}/messages/devicebound/{id}", DEVICE),
    ("POST", "/devices/{id}/messages/devicebound/{id}/abandon", DEVICE),
    ("POST", "/devices/{id}/messages/events", DEVICE),
    ("GET", "/twins/{id}", TWIN_READERS),
    ("PATCH", "/twins/{id}", SERVICE),
    // Replace twin (issue 14 item 8): a twin change, as PATCH.
    ("PUT", "/twins/{id}", SERVICE),
    ("POST", "/twins/{id}/methods", SERVICE),
    ("GET", "/messages/events", SERVICE),
];

/// Every literal word of every route, and a plain id.
const IDS: &[&str] = &[
    "enrollmentgroups",
    "enrollments",
    "registrations",
    "query",
    "attestationmechanism",
    "devices",
    "twins",
    "methods",
    "messages",
    "devicebound",
    "events",
    "statistics",
    "service",
    "linkedhubs",
    "policies",
    "renewkey",
    "audit",
    "commands",
    "servicebound",
    "feedback",
    "abandon",
    "plain-id",
];

const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH"];

/// The template a concrete path matches, as a router does it: literal segments before `{id}`.
fn matching_template<'r>(routes: &'r [(&str, &'r str, &[&str])], path: &str) -> Option<&'r str> {
    let segs: Vec<_> = path.split('/').collect();
    let mut best: Option<(&str, usize)> = None;
    for (_, template, _) in routes {
        let t: Vec<_> = template.split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let literal_hits = t.iter().zip(&segs).filter(|(t, s)| t == s).count();
        let matches = t.iter().zip(&segs).all(|(t, s)| *t == "{id}" || t == s);
        if matches && best.is_none_or(|(_, n)| literal_hits > n) {
            best = Some((template, literal_hits));
        }
    }
    best.map(|(t, _)| t)
}

fn token(p: &AccessPolicy, host: &str) -> String {
    let key = SymmetricKey::from_base64(&p.primary_key).unwrap();
    build_token(&key, host, Timestamp::now().unix_seconds() + 600, Some(&p.key_name))
}

/// A body that the route would accept from a caller allowed to make the call.
fn body(template: &str, id: &str) -> Option<Value> {
    Some(match template {
        "/enrollmentgroups/query" => json!({"query": "SELECT * FROM enrollmentGroups"}),
        "/enrollments/query" => json!({"query": "SELECT * FROM enrollments"}),
        "/registrations/{id}/query" => json!({"query": "SELECT * FROM registrations"}),
        "/devices/query" => json!({"query": "SELECT * FROM devices"}),
        "/enrollmentgroups/{id}" => json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey"}}),
        "/enrollments/{id}" => json!({"registrationId": id, "attestation": {"type": "symmetricKey"}}),
        "/enrollments" => json!({"mode": "create", "enrollments": [
            {"registrationId": format!("bulk-{id}"), "attestation": {"type": "symmetricKey"}}]}),
        "/devices/{id}" => json!({"deviceId": id}),
        "/twins/{id}" => json!({"tags": {"a": 1}}),
        "/twins/{id}/methods" => json!({"methodName": "x", "responseTimeoutInSeconds": 5}),
        "/devices/{id}/messages/devicebound" => json!("hello"),
        _ => return None,
    })
}

/// Runs every concrete path of `routes` × every method for `policy`; returns how many requests
/// were made. `routes` is the API's expectation table.
async fn run_policy(
    s: &TestServer,
    routes: &[(&str, &str, &[&str])],
    policy: &AccessPolicy,
    host: &str,
    api_version: &str,
) -> usize {
    let mut paths: Vec<String> = Vec::new();
    for (_, template, _) in routes {
        for id in IDS {
            let p = template.replace("{id}", id);
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    let token = token(policy, host);
    let mut calls = Vec::new();
    for path in &paths {
        let template = matching_template(routes, path).expect("every path matches its own template");
        for method in METHODS {
            calls.push((path.clone(), template, *method));
        }
    }
    let n = calls.len();
    // One client, so its connections are reused (a TLS handshake per call was most of the time).
    let http = &s.http();
    // Concurrently: the outcome of each call does not depend on the others'.
    futures_util::stream::iter(calls)
        .for_each_concurrent(16, |(path, template, method)| {
            let token = &token;
            async move {
                let allowed = routes.iter().find(|(m, t, _)| *m == method && *t == template).map(|(_, _, a)| *a);
                let query = if template == "/messages/events" { "from=0&format=json&" } else { "" };
                let id = path.rsplit('/').find(|s| IDS.contains(s)).unwrap_or("");
                let url = s.url(&format!("{path}?{query}api-version={api_version}"));
                let mut req = http.request(Method::from_bytes(method.as_bytes()).unwrap(), url);
                req = req.header("Authorization", token);
                if let Some(b) = body(template, id).filter(|_| ["PUT", "POST", "PATCH"].contains(&method)) {
                    req = req.json(&b);
                }
                let status = match req.send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => panic!("{} {method} {path}: {e:?}", policy.key_name),
                };
                let who = &policy.key_name;
                match allowed {
                    Some(a) if a.contains(&who.as_str()) => {
                        assert!(![401, 405].contains(&status), "{who} {method} {path} ({template}): got {status}");
                    }
                    Some(_) => assert_eq!(status, 401, "{who} {method} {path} ({template}) must need another right"),
                    None => assert_eq!(status, 405, "{who} {method} {path} ({template}) is not a route"),
                }
            }
        })
        .await;
    n
}

/// A server whose TLS handshakes may take long (the matrix runs many requests at once, and a
/// loaded machine must not turn a slow handshake into a failed call) and that never turns away
/// a source for its refusals (the matrix's refusals are the point; `faults.rs` tests that limit).
async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.limits.handshake_timeout = std::time::Duration::from_secs(30);
        c.audit.refusals.max_failures = 0;
    })
    .await
}

#[tokio::test]
async fn dps_routes_methods_rights_with_route_words_as_ids() {
    let s = server().await;
    let host = format!("localhost:{}", s.https_addr().port());
    let store = s.store();
    let policies = store.policies("dps").await.unwrap();
    let readers_first: Vec<_> = {
        let mut p = policies.clone();
        // Read-only policies go first, so the state they leave can be checked untouched.
        p.sort_by_key(|p| !p.key_name.ends_with("read"));
        p
    };
    let mut n = 0;
    for p in &readers_first {
        if p.key_name.ends_with("read") {
            n += run_policy(&s, DPS_ROUTES, p, &host, "2021-10-01").await;
        }
    }
    assert!(store.groups().await.unwrap().is_empty(), "a read-only policy created an enrollment group");
    assert!(store.enrollments(0, 10).await.unwrap().is_empty(), "a read-only policy created an enrollment");
    for p in &readers_first {
        if !p.key_name.ends_with("read") {
            n += run_policy(&s, DPS_ROUTES, p, &host, "2021-10-01").await;
        }
    }
    // Every id × 8 templates with an id, and 6 literal routes (2 of which an id already spelled).
    assert_eq!(n, policies.len() * METHODS.len() * (IDS.len() * 8 + 6 - 2));
}

#[tokio::test]
async fn hub_routes_methods_rights_with_route_words_as_ids() {
    let s = server().await;
    let host = format!("localhost:{}", s.https_addr().port());
    let store = s.store();
    let policies = store.policies(&format!("hub:{}", s.hub())).await.unwrap();
    let before = store.devices(&s.hub(), 0, 100).await.unwrap().len();
    let mut n = 0;
    for p in policies.iter().filter(|p| !REGISTRY_WRITERS.contains(&p.key_name.as_str())) {
        n += run_policy(&s, HUB_ROUTES, p, &host, "2021-04-12").await;
    }
    assert_eq!(
        store.devices(&s.hub(), 0, 100).await.unwrap().len(),
        before,
        "a policy without registry write made a device"
    );
    for p in policies.iter().filter(|p| REGISTRY_WRITERS.contains(&p.key_name.as_str())) {
        n += run_policy(&s, HUB_ROUTES, p, &host, "2021-04-12").await;
    }
    // Every id × 10 templates with an id, and 6 literal routes (1 of which, /devices/query, the
    // id `query` already spelled).
    assert_eq!(n, policies.len() * METHODS.len() * (IDS.len() * 10 + 6 - 1));
}

/// The attack of issue 12, step by step: a read-only key could create a group named
/// `attestationmechanism` with a key of its choosing, derive a device's key from it and take
/// the device over; `registrationstatusread` could delete the record `query`. Writes, allowed or
/// not, reach the audit trail.
#[tokio::test]
async fn read_only_keys_cannot_write_through_route_words_and_writes_are_audited() {
    let s = TestServer::start().await;
    let host = format!("localhost:{}", s.https_addr().port());
    let policies = s.store().policies("dps").await.unwrap();
    let by_name = |n: &str| policies.iter().find(|p| p.key_name == n).unwrap().clone();
    let own_key = SymmetricKey::generate().to_base64();
    let group = json!({"enrollmentGroupId": "attestationmechanism", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": own_key, "secondaryKey": own_key}}});
    let put = |p: &AccessPolicy, path: &str, body: &Value| {
        s.http()
            .put(s.url(&format!("{path}?api-version=2021-10-01")))
            .header("Authorization", token(p, &host))
            .json(body)
            .send()
    };
    let reader = by_name("enrollmentread");
    assert_eq!(put(&reader, "/enrollmentGroups/attestationmechanism", &group).await.unwrap().status(), 401);
    assert_eq!(put(&reader, "/enrollmentGroups/query", &group).await.unwrap().status(), 405);
    let enrollment = json!({"registrationId": "attestationmechanism", "attestation": {"type": "symmetricKey"}});
    assert_eq!(put(&reader, "/enrollments/attestationmechanism", &enrollment).await.unwrap().status(), 401);
    assert!(s.store().groups().await.unwrap().is_empty());
    let delete = s
        .http()
        .delete(s.url("/registrations/query?api-version=2021-10-01"))
        .header("Authorization", token(&by_name("registrationstatusread"), &host))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 401);

    // The owner may; its writes to route-word ids are audited like any other.
    let owner = by_name(DPS_OWNER);
    assert_eq!(put(&owner, "/enrollmentGroups/attestationmechanism", &group).await.unwrap().status(), 200);
    let q = AuditQuery { id: Some("attestationmechanism".into()), ..Default::default() };
    // The trail is written behind the request.
    common::wait_until("the owner's write is audited", async || {
        s.store().audit(&q).await.unwrap().iter().any(|e| e.actor == DPS_OWNER)
    })
    .await;
    let entries = s.store().audit(&q).await.unwrap();
    let e = entries.iter().find(|e| e.actor == DPS_OWNER).expect("the owner's write is audited");
    assert_eq!(e.operation, "PUT /enrollmentgroups/attestationmechanism");
    assert_eq!((e.category, e.outcome, e.status), (AuditCategory::ServiceOperations, Outcome::Success, Some(200)));
    assert!(
        entries.iter().any(|e| e.actor != DPS_OWNER && e.outcome == Outcome::Failure),
        "the refused write is audited: {entries:?}"
    );
}

/// A trailing slash is dropped before routing (Azure ignores it), so the rights are still those
/// of the route it names: a read-only policy cannot write through `/devices/x/`.
#[tokio::test]
async fn trailing_slashes_route_and_keep_their_rights() {
    let s = TestServer::start().await;
    let host = format!("localhost:{}", s.https_addr().port());
    let policies = s.store().policies(&format!("hub:{}", s.hub())).await.unwrap();
    let by_name = |n: &str| policies.iter().find(|p| p.key_name == n).unwrap().clone();
    let (reader, owner) = (by_name("registryRead"), by_name("iothubowner"));
    let call = |m: Method, p: &AccessPolicy, path: &str| {
        s.http()
            .request(m, s.url(&format!("{path}?api-version=2021-04-12")))
            .header("Authorization", token(p, &host))
            .json(&json!({"deviceId": "x"}))
            .send()
    };
    assert_eq!(call(Method::PUT, &reader, "/devices/x/").await.unwrap().status(), 401);
    assert!(s.store().devices(&s.hub(), 0, 10).await.unwrap().is_empty(), "the refused write made nothing");
    assert_eq!(call(Method::PUT, &owner, "/devices/x/").await.unwrap().status(), 200);
    assert_eq!(call(Method::GET, &reader, "/devices/x/").await.unwrap().status(), 200);
    let list = call(Method::GET, &reader, "/devices/").await.unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(list.json::<Vec<Value>>().await.unwrap().len(), 1);
    assert_eq!(call(Method::DELETE, &reader, "/devices/x/").await.unwrap().status(), 401);
    assert_eq!(call(Method::GET, &reader, "/statistics/devices/").await.unwrap().status(), 200);
}

/// A token whose `sr` names a path is limited to that path, as in Azure.
#[tokio::test]
async fn tokens_are_limited_to_the_path_their_resource_names() {
    let s = TestServer::start().await;
    s.create_group("g1", json!({})).await;
    s.create_device("dev-1").await;
    let port = s.https_addr().port();
    let dps_owner = s.store().policies("dps").await.unwrap()[0].clone();
    let hub_owner = s.store().policies(&format!("hub:{}", s.hub())).await.unwrap()[0].clone();
    let get = |p: &AccessPolicy, sr: String, path: &str| {
        s.http().get(s.url(&format!("{path}?api-version=2021-10-01"))).header("Authorization", token(p, &sr)).send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(get(&dps_owner, format!("localhost:{port}"), "/enrollmentGroups/g1").await.unwrap()), 200);
    assert_eq!(
        status(get(&dps_owner, format!("localhost:{port}/enrollmentGroups/g1"), "/enrollmentGroups/g1").await.unwrap()),
        200
    );
    assert_eq!(
        status(get(&dps_owner, format!("localhost:{port}/registrations/xyz"), "/enrollmentGroups/g1").await.unwrap()),
        401
    );
    assert_eq!(
        status(get(&dps_owner, format!("localhost:{port}/registrations/xyz"), "/registrations/abc").await.unwrap()),
        401
    );
    assert_eq!(
        status(get(&hub_owner, format!("localhost:{port}/devices/dev-1"), "/devices/dev-1").await.unwrap()),
        200
    );
    assert_eq!(
        status(get(&hub_owner, format!("localhost:{port}/devices/other"), "/devices/dev-1").await.unwrap()),
        401
    );
    assert_eq!(status(get(&hub_owner, format!("localhost:{port}/devices/other"), "/devices").await.unwrap()), 401);
    assert_eq!(status(get(&hub_owner, format!("localhost:{port}/devices"), "/devices").await.unwrap()), 200);
}
