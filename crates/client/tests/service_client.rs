//! The service clients against a real server: typed results with Azure's member names, the raw
//! JSON beside them, and error answers as the variants a caller matches on. Only
//! `fleetgate_client` paths are used: the crate is enough on its own.

mod common;

use common::Server;
use fleetgate_client::{
    AttestationMechanism, BulkMode, ConnectionString, Device, DpsServiceClient, EnrollmentGroup, Error,
    IndividualEnrollment, SymmetricKey, SymmetricKeyAttestation,
};
use serde_json::json;

#[tokio::test]
async fn typed_results_and_raw_json() {
    let s = Server::start(true).await;
    let dps = s.service();
    let mut g = EnrollmentGroup::symmetric_key("grp-typed");
    g.extra.insert("capabilities".into(), json!({"iotEdge": false}));
    let created = dps.put_enrollment_group(&g, None).await.unwrap();
    assert_eq!(created.enrollment_group_id, "grp-typed");
    assert_eq!(created.attestation.kind, "symmetricKey");
    assert_eq!(created.provisioning_status.as_deref(), Some("enabled"));
    let etag = created.etag.clone().unwrap();

    // Reads leave the keys out; the attestation call has them.
    let read = dps.get_enrollment_group("grp-typed").await.unwrap();
    assert_eq!(read.etag.as_deref(), Some(etag.as_str()));
    assert_eq!(read.extra["capabilities"], json!({"iotEdge": false}), "unmodelled members are kept");
    let keys = dps.enrollment_group_attestation("grp-typed").await.unwrap();
    let primary = keys.symmetric_key.unwrap().primary_key.unwrap();
    assert!(SymmetricKey::from_base64(&primary).is_ok());

    // The raw client gives Azure's JSON as sent, member order included.
    let raw = dps.raw().get_enrollment_group("grp-typed").await.unwrap();
    assert_eq!(raw["enrollmentGroupId"], "grp-typed");
    assert_eq!(serde_json::to_value(&read).unwrap(), raw, "typed and raw agree");

    // An update with the etag; a stale etag is PreconditionFailed.
    let mut upd = read.clone();
    upd.provisioning_status = Some("disabled".into());
    let updated = dps.put_enrollment_group(&upd, Some(&etag)).await.unwrap();
    assert_eq!(updated.provisioning_status.as_deref(), Some("disabled"));
    let e = dps.put_enrollment_group(&upd, Some(&etag)).await.unwrap_err();
    assert!(matches!(&e, Error::PreconditionFailed(a) if a.status == 412), "{e:?}");
    assert_eq!(dps.list_enrollment_groups().await.unwrap().len(), 1);

    // Individual enrollments and bulk operations.
    let e1 = IndividualEnrollment {
        registration_id: "dev-1".into(),
        attestation: AttestationMechanism::symmetric_key(None),
        ..Default::default()
    };
    let got = dps.put_enrollment(&e1, None).await.unwrap();
    assert_eq!(got.registration_id, "dev-1");
    let bad = IndividualEnrollment { registration_id: "bad id!".into(), ..e1.clone() };
    let two = IndividualEnrollment { registration_id: "dev-2".into(), ..e1.clone() };
    let r = dps.bulk_enrollments(BulkMode::Create, &[two, bad]).await.unwrap();
    assert!(!r.is_successful);
    assert_eq!(r.errors.len(), 1);
    assert_eq!(r.errors[0].registration_id, "bad id!");
    let all: Vec<_> = dps.list_enrollments().await.unwrap().into_iter().map(|e| e.registration_id).collect();
    assert_eq!(all.len(), 2, "{all:?}");

    // The hub: a device identity with generated keys, its twin.
    let hub = s.hub_service();
    let d = hub.create_device(&Device::with_generated_keys("dev-hub")).await.unwrap();
    let keys = d.authentication.as_ref().unwrap().symmetric_key.as_ref().unwrap();
    assert!(keys.primary_key.is_some() && keys.secondary_key.is_some());
    assert_eq!(hub.list_devices(None).await.unwrap().len(), 1);
    let twin = hub.patch_twin("dev-hub", &json!({"tags": {"site": "north"}}), None).await.unwrap();
    assert_eq!(twin.tags.unwrap()["site"], "north");
    assert_eq!(hub.get_twin("dev-hub").await.unwrap().device_id, "dev-hub");
    let _: SymmetricKeyAttestation = keys.clone();
}

#[tokio::test]
async fn error_answers_are_typed() {
    let s = Server::start(true).await;
    let dps = s.service();

    let e = dps.get_enrollment_group("nope").await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(a) if a.status == 404 && a.error_code.is_some()), "{e:?}");
    assert!(e.is_not_found() && !e.is_retryable());
    assert_eq!(e.api_error().unwrap().body["errorCode"].as_u64().map(|c| c as u32), e.api_error().unwrap().error_code);
    let e = s.hub_service().get_device("nope").await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    let e = s.hub_service().invoke_method("nope", "reboot", json!({}), 5).await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");

    // A key the service does not know: 401, Unauthorized.
    let mut wrong: ConnectionString = s.connection_string();
    wrong.key = SymmetricKey::generate();
    let e = DpsServiceClient::new(wrong, Some(&s.ca_pem())).unwrap().list_enrollment_groups().await.unwrap_err();
    assert!(matches!(&e, Error::Unauthorized(a) if a.status == 401), "{e:?}");
    assert!(!e.is_retryable());

    // A CA that did not sign the server's certificate: Tls, with the cause kept.
    let other = tempfile::tempdir().unwrap();
    let other_server = fleetgate_server::start(common::config(other.path())).await.unwrap();
    let other_ca = std::fs::read(other.path().join("ca.pem")).unwrap();
    let e = DpsServiceClient::new(s.connection_string(), Some(&other_ca)).unwrap().healthz().await.unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.detail().to_ascii_lowercase().contains("certificate"), "{}", e.detail());
    other_server.shutdown().await;
    assert!(matches!(DpsServiceClient::new(s.connection_string(), Some(b"nothing")), Err(Error::Tls { .. })));

    // Nothing listening: Transport.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = s.connection_string();
    c.host_name = format!("localhost:{closed_port}");
    let e = DpsServiceClient::new(c, Some(&s.ca_pem())).unwrap().healthz().await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
}

#[tokio::test]
async fn throttled_answers_carry_retry_after() {
    // After 3 refused authentications the source is turned away (429 + Retry-After) for a minute.
    let s = Server::start_with(|c| {
        c.audit.refusals.max_failures = 3;
        c.audit.refusals.backoff = std::time::Duration::from_secs(60);
    })
    .await;
    let mut wrong: ConnectionString = s.connection_string();
    wrong.key = SymmetricKey::generate();
    let dps = DpsServiceClient::new(wrong, Some(&s.ca_pem())).unwrap();
    for _ in 0..3 {
        let e = dps.get_registration("dev-1").await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized(_)), "{e:?}");
    }
    let e = dps.get_registration("dev-1").await.unwrap_err();
    match &e {
        Error::Throttled { retry_after: Some(wait), error } => {
            assert_eq!(error.status, 429);
            assert!(*wait > std::time::Duration::ZERO && *wait <= std::time::Duration::from_secs(60), "{wait:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.is_retryable());
    assert!(e.retry_after().is_some());
}
