//! The access-policy matrix: every policy against every service API call, allowed or 401.

mod common;

use common::TestServer;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::policy::AccessPolicy;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use fleetgate_store::InstanceStore;
use reqwest::Method;
use serde_json::json;

fn token(p: &AccessPolicy, host: &str) -> String {
    let key = SymmetricKey::from_base64(&p.primary_key).unwrap();
    build_token(&key, host, Timestamp::now().unix_seconds() + 600, Some(&p.key_name))
}

async fn status(s: &TestServer, method: Method, path: &str, token: &str, body: Option<serde_json::Value>) -> u16 {
    let mut req = s.http().request(method, s.url(path)).header("Authorization", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn dps_policy_matrix() {
    let s = TestServer::start().await;
    s.create_group("g", json!({})).await;
    let host = format!("localhost:{}", s.https_addr().port());
    let policies = s.store().policies("dps").await.unwrap();
    let q = json!({"query": "SELECT * FROM enrollmentGroups"});
    // (call, the policies allowed to make it)
    let calls: Vec<(Method, &str, Option<serde_json::Value>, &[&str])> = vec![
        (Method::GET, "/enrollmentGroups/g", None, &["provisioningserviceowner", "enrollmentread", "enrollmentwrite"]),
        (
            Method::POST,
            "/enrollmentGroups/query",
            Some(q),
            &["provisioningserviceowner", "enrollmentread", "enrollmentwrite"],
        ),
        (
            Method::PUT,
            "/enrollmentGroups/g2",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
            &["provisioningserviceowner", "enrollmentwrite"],
        ),
        (
            Method::GET,
            "/registrations/nobody",
            None,
            &["provisioningserviceowner", "registrationstatusread", "registrationstatuswrite"],
        ),
        (Method::DELETE, "/registrations/nobody", None, &["provisioningserviceowner", "registrationstatuswrite"]),
    ];
    let mut checked = 0;
    for p in &policies {
        for (method, path, body, allowed) in &calls {
            let got =
                status(&s, method.clone(), &format!("{path}?api-version=2021-10-01"), &token(p, &host), body.clone())
                    .await;
            if allowed.contains(&p.key_name.as_str()) {
                assert_ne!(got, 401, "{} {method} {path}", p.key_name);
            } else {
                assert_eq!(got, 401, "{} {method} {path}", p.key_name);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 25);
}

#[tokio::test]
async fn hub_policy_matrix() {
    let s = TestServer::start().await;
    s.create_device("dev-1").await;
    let host = format!("localhost:{}", s.https_addr().port());
    let policies = s.store().policies(&format!("hub:{}", s.hub())).await.unwrap();
    let names: Vec<_> = policies.iter().map(|p| p.key_name.as_str()).collect();
    assert_eq!(names, ["iothubowner", "service", "device", "registryRead", "registryReadWrite"]);
    let calls: Vec<(Method, &str, Option<serde_json::Value>, &[&str])> = vec![
        (Method::GET, "/devices/dev-1", None, &["iothubowner", "registryRead", "registryReadWrite"]),
        (Method::GET, "/devices", None, &["iothubowner", "registryRead", "registryReadWrite"]),
        (Method::PUT, "/devices/dev-9", Some(json!({"deviceId": "dev-9"})), &["iothubowner", "registryReadWrite"]),
        (Method::GET, "/twins/dev-1", None, &["iothubowner", "service", "registryRead", "registryReadWrite"]),
        (Method::PATCH, "/twins/dev-1", Some(json!({"tags": {"a": 1}})), &["iothubowner", "service"]),
        (
            Method::POST,
            "/twins/dev-1/methods",
            Some(json!({"methodName": "x", "responseTimeoutInSeconds": 5})),
            &["iothubowner", "service"],
        ),
        (Method::GET, "/messages/events?from=0&format=json", None, &["iothubowner", "service"]),
    ];
    for p in &policies {
        for (method, path, body, allowed) in &calls {
            let sep = if path.contains('?') { '&' } else { '?' };
            let got = status(
                &s,
                method.clone(),
                &format!("{path}{sep}api-version=2021-04-12"),
                &token(p, &host),
                body.clone(),
            )
            .await;
            if allowed.contains(&p.key_name.as_str()) {
                assert_ne!(got, 401, "{} {method} {path}", p.key_name);
            } else {
                assert_eq!(got, 401, "{} {method} {path}: the device policy never opens the service API", p.key_name);
            }
        }
    }
    // A hub policy does not open the DPS API, nor a DPS policy the hub's.
    let owner = &policies[0];
    assert_eq!(
        status(&s, Method::GET, "/enrollmentGroups/x?api-version=2021-10-01", &token(owner, &host), None).await,
        401
    );
    let dps_owner = &s.store().policies("dps").await.unwrap()[0];
    assert_eq!(
        status(&s, Method::GET, "/devices/dev-1?api-version=2021-04-12", &token(dps_owner, &host), None).await,
        401
    );
}

#[tokio::test]
async fn renewing_a_key_takes_effect_at_once() {
    let s = TestServer::start().await;
    let host = format!("localhost:{}", s.https_addr().port());
    let before = s.store().policies("dps").await.unwrap()[0].clone();
    assert_eq!(
        status(&s, Method::GET, "/enrollmentGroups/x?api-version=2021-10-01", &token(&before, &host), None).await,
        404
    );
    let renewed = s.service().renew_policy_key(None, "provisioningserviceowner", false).await.unwrap();
    let renewed: fleetgate_core::policy::AccessPolicy = serde_json::from_value(renewed).unwrap();
    assert_ne!(renewed.primary_key, before.primary_key);
    assert_eq!(renewed.secondary_key, before.secondary_key);
    assert_eq!(
        status(&s, Method::GET, "/enrollmentGroups/x?api-version=2021-10-01", &token(&before, &host), None).await,
        401
    );
    assert_eq!(
        status(&s, Method::GET, "/enrollmentGroups/x?api-version=2021-10-01", &token(&renewed, &host), None).await,
        404
    );
    let inst = fleetgate_server::Instance::read(s.dir.path()).unwrap();
    assert!(inst.service_connection_string.ends_with(&renewed.primary_key), "instance.json follows");
}
