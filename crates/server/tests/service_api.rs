//! The DPS service REST API over real HTTPS with SAS auth.

mod common;

use common::TestServer;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use serde_json::{json, Value};

const V: &str = "?api-version=2021-10-01";

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert!(ct.starts_with("application/json"), "error bodies are JSON, got {ct:?}");
    let code = resp.headers().get("x-ms-error-code").map(|v| v.to_str().unwrap().to_owned());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(code.as_deref(), Some(body["errorCode"].to_string().as_str()));
    assert!(body["trackingId"].is_string() && body["message"].is_string() && body["timestampUtc"].is_string());
    (status, body)
}

#[tokio::test]
async fn group_lifecycle_with_keys_redaction_and_etags() {
    let s = TestServer::start().await;
    let svc = s.service();
    let created = svc
        .put_enrollment_group(
            &json!({"enrollmentGroupId": "grp-1", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}},
                    "initialTwin": {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}}}),
            None,
        )
        .await
        .unwrap();
    let sk = &created["attestation"]["symmetricKey"];
    assert_eq!(sk["primaryKey"], "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    let secondary = SymmetricKey::from_base64(sk["secondaryKey"].as_str().unwrap()).unwrap();
    assert_eq!(secondary.as_bytes().len(), 64, "a missing key is generated: 64 random bytes");
    assert_eq!(created["provisioningStatus"], "enabled");
    assert_eq!(created["initialTwin"]["properties"]["desired"]["interval"], 30);

    // GET leaves the keys out; the attestation mechanism call returns them.
    let got = svc.get_enrollment_group("grp-1").await.unwrap();
    assert_eq!(got["attestation"]["symmetricKey"], json!({}));
    assert_eq!(got["etag"], created["etag"]);
    let att = svc.enrollment_group_attestation("grp-1").await.unwrap();
    assert_eq!(att["symmetricKey"], *sk);

    // Update with the current etag; a stale one is refused with 412 and changes nothing.
    let etag = created["etag"].as_str().unwrap();
    let mut upd = got.clone();
    upd["provisioningStatus"] = "disabled".into();
    let updated = svc.put_enrollment_group(&upd, Some(etag)).await.unwrap();
    assert_eq!(updated["provisioningStatus"], "disabled");
    assert_eq!(updated["attestation"]["symmetricKey"], *sk, "keys survive an update that omitted them");
    assert_eq!(updated["createdDateTimeUtc"], created["createdDateTimeUtc"]);
    let e = svc.put_enrollment_group(&upd, Some(etag)).await.unwrap_err();
    assert_eq!(e.status(), Some(412));
    let e = svc.delete_enrollment_group("grp-1", Some(etag)).await.unwrap_err();
    assert_eq!(e.status(), Some(412));
    assert_eq!(svc.get_enrollment_group("grp-1").await.unwrap()["provisioningStatus"], "disabled");
    svc.put_enrollment_group(&upd, Some("*")).await.unwrap();

    svc.delete_enrollment_group("grp-1", None).await.unwrap();
    let e = svc.get_enrollment_group("grp-1").await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    let e = svc.delete_enrollment_group("grp-1", None).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
}

#[tokio::test]
async fn query_pages_with_continuation() {
    let s = TestServer::start().await;
    for i in 0..7 {
        s.create_group(&format!("g{i}"), json!({})).await;
    }
    let http = s.http();
    let mut seen = Vec::new();
    let mut cont: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut req = http
            .post(s.url(&format!("/enrollmentGroups/query{V}")))
            .header("Authorization", s.service_token())
            .header("x-ms-max-item-count", "3")
            .json(&json!({"query": "SELECT * FROM enrollmentGroups"}));
        if let Some(c) = &cont {
            req = req.header("x-ms-continuation", c);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        cont = resp.headers().get("x-ms-continuation").map(|v| v.to_str().unwrap().to_owned());
        let items: Vec<Value> = resp.json().await.unwrap();
        assert!(items.len() <= 3);
        for i in items {
            assert_eq!(i["attestation"]["symmetricKey"], json!({}), "query results are redacted");
            seen.push(i["enrollmentGroupId"].as_str().unwrap().to_owned());
        }
        pages += 1;
        if cont.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..7).map(|i| format!("g{i}")).collect::<Vec<_>>());
    assert_eq!(s.service().list_enrollment_groups().await.unwrap().len(), 7);

    // Bad paging headers and unsupported queries are 400s.
    for (h, v, q) in [
        ("x-ms-max-item-count", "0", "SELECT * FROM enrollmentGroups"),
        ("x-ms-continuation", "abc", "SELECT * FROM enrollmentGroups"),
        ("x-ms-max-item-count", "5", "SELECT * FROM devices"),
    ] {
        let resp = http
            .post(s.url(&format!("/enrollmentGroups/query{V}")))
            .header("Authorization", s.service_token())
            .header(h, v)
            .json(&json!({"query": q}))
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(resp).await;
        assert_eq!((status, body["errorCode"].as_u64()), (400, Some(400004)), "{h}: {v} / {q}");
    }
}

#[tokio::test]
async fn authentication_is_required_and_checked() {
    let s = TestServer::start().await;
    let http = s.http();
    let c = s.service_connection_string();
    let later = Timestamp::now().unix_seconds() + 600;
    let tokens = [
        None,
        Some("garbage".to_owned()),
        // Wrong key.
        Some(build_token(&SymmetricKey::generate(), &c.host_name, later, Some(&c.key_name))),
        // Unknown policy.
        Some(build_token(&c.key, &c.host_name, later, Some("registryRead"))),
        // No policy name.
        Some(build_token(&c.key, &c.host_name, later, None)),
        // Expired beyond the skew.
        Some(build_token(&c.key, &c.host_name, Timestamp::now().unix_seconds() - 400, Some(&c.key_name))),
        // For another host.
        Some(build_token(&c.key, "elsewhere.example", later, Some(&c.key_name))),
        // A device token never opens the service API.
        Some(build_token(&c.key, &format!("{}/registrations/dev", s.scope()), later, Some("registration"))),
    ];
    for t in tokens {
        let mut req = http.get(s.url(&format!("/enrollmentGroups/x{V}")));
        if let Some(t) = &t {
            req = req.header("Authorization", t);
        }
        let (status, body) = error_of(req.send().await.unwrap()).await;
        assert_eq!((status, body["errorCode"].as_u64()), (401, Some(401002)), "{t:?}");
    }
    // The Node/Python service clients' forms (raw or encoded host as sr) both work.
    let raw = format!(
        "SharedAccessSignature sr={h}&sig={sig}&skn={n}&se={later}",
        h = c.host_name,
        sig = percent_encoding::utf8_percent_encode(
            &fleetgate_core::sas::sign(&c.key, &c.host_name, &later.to_string()),
            fleetgate_core::sas::URI_COMPONENT
        ),
        n = c.key_name
    );
    let resp =
        http.get(s.url(&format!("/enrollmentGroups/none{V}"))).header("Authorization", raw).send().await.unwrap();
    assert_eq!(resp.status(), 404, "authenticated, then not found");
}

#[tokio::test]
async fn bad_requests_get_azure_errors() {
    let s = TestServer::start().await;
    let http = s.http();
    let put = |path: &str, body: Vec<u8>| {
        http.put(s.url(&format!("{path}{V}")))
            .header("Authorization", s.service_token())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(&str, Vec<u8>, u16, u64)> = vec![
        ("/enrollmentGroups/g1", b"{not json".to_vec(), 400, 400004),
        ("/enrollmentGroups/g1", br#"{"attestation":{"type":"tpm"}}"#.to_vec(), 400, 400004),
        (
            "/enrollmentGroups/g1",
            br#"{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"c2hvcnQ="}}}"#.to_vec(),
            400,
            400004,
        ),
        (
            "/enrollmentGroups/g1",
            br#"{"attestation":{"type":"symmetricKey"},"iotHubHostName":"not-linked.example"}"#.to_vec(),
            400,
            400209,
        ),
        ("/enrollmentGroups/bad%20id", br#"{"attestation":{"type":"symmetricKey"}}"#.to_vec(), 400, 400005),
        ("/enrollmentGroups/g1", vec![b' '; 300 * 1024], 413, 413000),
    ];
    for (path, body, status, code) in cases {
        let (st, b) = error_of(put(path, body).await.unwrap()).await;
        assert_eq!((st, b["errorCode"].as_u64()), (status, Some(code)), "{path}");
    }
    assert_eq!(s.service().list_enrollment_groups().await.unwrap().len(), 0, "nothing was stored");

    // Unknown routes and methods.
    let (st, b) =
        error_of(http.get(s.url("/nothing/here")).header("Authorization", s.service_token()).send().await.unwrap())
            .await;
    assert_eq!((st, b["errorCode"].as_u64()), (404, Some(404000)));
    let (st, _) = error_of(
        http.patch(s.url(&format!("/enrollmentGroups/g1{V}")))
            .header("Authorization", s.service_token())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 405);
    let (st, b) = error_of(
        http.get(s.url(&format!("/registrations/nobody{V}")))
            .header("Authorization", s.service_token())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((st, b["errorCode"].as_u64()), (404, Some(404201)));
}

#[tokio::test]
async fn paths_are_case_insensitive_as_sdks_differ() {
    let s = TestServer::start().await;
    s.create_group("Grp-A", json!({})).await;
    let http = s.http();
    for path in ["/enrollmentgroups/grp-a/attestationmechanism", "/EnrollmentGroups/GRP-A/AttestationMechanism"] {
        let resp =
            http.post(s.url(&format!("{path}{V}"))).header("Authorization", s.service_token()).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "symmetricKey");
    }
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_served_and_old_versions_refused() {
    let s = TestServer::start().await;
    for versions in [&[&rustls::version::TLS12][..], &[&rustls::version::TLS13][..]] {
        let tls = s.tls_to(s.https_addr(), versions).await;
        assert_eq!(tls.get_ref().1.protocol_version(), Some(versions[0].version));
    }
    // A TLS 1.0 ClientHello gets no handshake.
    let mut tcp = tokio::net::TcpStream::connect(s.https_addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00,
    ];
    tcp.write_all(hello).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tcp.read(&mut buf).await.unwrap_or(0);
    // Either an alert record (0x15) or a closed connection, never a ServerHello (0x16).
    assert!(n == 0 || buf[0] == 0x15, "got {:?}", &buf[..n]);
}

/// Clients list AES-256-GCM first (rustls, OpenSSL); the server picks AES-128-GCM, whose SHA-256
/// runs on the CPU's SHA extensions, in TLS 1.3 and in TLS 1.2 (what the Python SDK speaks).
#[tokio::test]
async fn the_server_picks_aes_128_gcm_over_the_clients_order() {
    let s = TestServer::start().await;
    let client_first = rustls::crypto::ring::default_provider().cipher_suites[0].suite();
    for (version, want) in [
        (&rustls::version::TLS13, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        (&rustls::version::TLS12, rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
    ] {
        assert_ne!(client_first, want, "the client should prefer another suite");
        let tls = s.tls_to(s.mqtt_addr(), &[version]).await;
        assert_eq!(tls.get_ref().1.negotiated_cipher_suite().map(|c| c.suite()), Some(want), "{version:?}");
    }
}

#[tokio::test]
async fn weak_ciphers_and_old_protocols_are_refused() {
    let s = TestServer::start().await;
    let addr = s.https_addr().to_string();
    let ca = s.dir.path().join("ca.pem");
    let probe = move |args: Vec<String>| {
        let mut cmd = std::process::Command::new("openssl");
        cmd.arg("s_client").arg("-connect").arg(&addr).arg("-CAfile").arg(&ca).args(args);
        cmd.stdin(std::process::Stdio::null());
        let out = cmd.output().expect("openssl is needed for this check");
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // A modern TLS 1.2 suite works (what the Python SDK negotiates).
    let ok = tokio::task::spawn_blocking({
        let probe = probe.clone();
        move || probe(a(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]))
    })
    .await
    .unwrap();
    assert!(ok.contains("Cipher is ECDHE-ECDSA-AES128-GCM-SHA256"), "{ok}");
    // CBC and RSA key exchange suites, and TLS 1.1, get no session.
    for args in [
        a(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"]),
        a(&["-tls1_2", "-cipher", "AES128-GCM-SHA256"]),
        a(&["-tls1_1"]),
    ] {
        let out = tokio::task::spawn_blocking({
            let probe = probe.clone();
            let args = args.clone();
            move || probe(args)
        })
        .await
        .unwrap();
        assert!(!out.contains("Cipher is ECDHE") && !out.contains("Cipher is AES"), "{args:?} negotiated: {out}");
    }
}

/// `GET /devices` pages with `x-ms-continuation` (at most 1,000 a page, as Azure), and the
/// service client follows it: `device-identity list --top N` returns N devices, not one page.
#[tokio::test]
async fn device_lists_page_through_instead_of_capping() {
    use futures_util::StreamExt;
    let s = TestServer::start().await;
    let n = 1003;
    futures_util::stream::iter(0..n)
        .for_each_concurrent(8, |i| {
            let s = &s;
            async move {
                let resp = s
                    .http()
                    .put(s.url(&format!("/devices/d{i:04}?api-version=2021-04-12")))
                    .header("Authorization", s.hub_token())
                    .json(&json!({"deviceId": format!("d{i:04}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
            }
        })
        .await;
    let page = |top: &str, cont: Option<&str>| {
        let mut req = s
            .http()
            .get(s.url(&format!("/devices?top={top}&api-version=2021-04-12")))
            .header("Authorization", s.hub_token());
        if let Some(c) = cont {
            req = req.header("x-ms-continuation", c);
        }
        req.send()
    };
    let first = page("2", None).await.unwrap();
    let cont = first.headers().get("x-ms-continuation").expect("more remain").to_str().unwrap().to_owned();
    let first: Vec<Value> = first.json().await.unwrap();
    let second: Vec<Value> = page("2", Some(&cont)).await.unwrap().json().await.unwrap();
    assert_eq!((first.len(), second.len()), (2, 2));
    assert!(second.iter().all(|d| !first.contains(d)), "the next page starts where the first ended");
    let capped = page("5000", None).await.unwrap();
    assert!(capped.headers().contains_key("x-ms-continuation"), "a capped page says more remain");
    assert_eq!(capped.json::<Vec<Value>>().await.unwrap().len(), 1000);
    assert_eq!(page("0", None).await.unwrap().status(), 400);

    let conn = s.running().instance.hubs[0].connection_string.parse().unwrap();
    let client = fleetgate_client::HubServiceClient::new(conn, Some(&s.ca_pem())).unwrap();
    let all = client.list_devices(None).await.unwrap();
    assert_eq!(all.len(), n);
    assert_eq!(client.list_devices(Some(1002)).await.unwrap().len(), 1002);
    assert_eq!(client.list_devices(Some(100_000)).await.unwrap().len(), n);
}

/// A request refused before its body was read says `Connection: close`: the server does not
/// read an unauthenticated body, so the connection cannot be reused.
#[tokio::test]
async fn refused_requests_with_bodies_close_their_connection() {
    let s = TestServer::start().await;
    let resp = s
        .http()
        .put(s.url(&format!("/enrollmentGroups/g{V}")))
        .header("Authorization", "SharedAccessSignature sr=x&sig=y&se=1&skn=z")
        .json(&json!({"attestation": {"type": "symmetricKey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers().get("connection").map(|v| v.to_str().unwrap()), Some("close"));
    let get =
        s.http().get(s.url(&format!("/enrollmentGroups/g{V}"))).header("Authorization", "x").send().await.unwrap();
    assert_eq!(get.status(), 401);
    assert!(get.headers().get("connection").is_none(), "a bodiless request keeps its connection");
}

/// A device's status lookup (a POST with a `DeviceRegistration` body) and Node's operation poll
/// (a GET with `{}`) read their bodies, so their connection stays usable: an answer given with
/// the body unread made hyper close the connection unannounced, and the client's next request on
/// it failed without an answer. A body a handler answers without reading is announced with
/// `Connection: close`.
#[tokio::test]
async fn answered_bodies_keep_the_connection_and_unread_ones_announce_its_close() {
    let s = TestServer::start().await;
    let (group_key, _) = s.create_group("grp-keep", json!({})).await;
    let key = group_key.derive_device_key("dev-keep");
    let (topic, _) = s.register("dev-keep", &key, None).await;
    assert!(topic.contains("/200/"), "{topic}");
    let token = common::device_token(&key, &s.scope(), "dev-keep");
    let lookup = s
        .http()
        .post(s.url(&format!("/{}/registrations/dev-keep?api-version=2021-06-01", s.scope())))
        .header("Authorization", &token)
        .json(&json!({"registrationId": "dev-keep"}))
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), 200);
    assert!(lookup.headers().get("connection").is_none(), "the body was read: the connection is kept");
    let poll = s
        .http()
        .get(s.url(&format!("/{}/registrations/dev-keep/operations/unknown?api-version=2021-06-01", s.scope())))
        .header("Authorization", &token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status(), 404);
    assert!(poll.headers().get("connection").is_none(), "Node's {{}} was read: the connection is kept");
    // The hub's event stream ignores a body: it says so.
    let events = s
        .http()
        .get(s.url("/messages/events?from=0&format=json&api-version=2021-04-12"))
        .header("Authorization", s.hub_token())
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers().get("connection").map(|v| v.to_str().unwrap()), Some("close"));
}
