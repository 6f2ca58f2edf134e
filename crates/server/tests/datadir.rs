//! The data directory: created once, reused after, secrets private.

mod common;

use common::{config, TestServer};

#[tokio::test]
async fn second_start_reuses_instance_ca_and_keys() {
    let mut s = TestServer::start().await;
    let first = s.running().instance.clone();
    let ca = s.ca_pem();
    let cert = std::fs::read(s.dir.path().join("server.pem")).unwrap();
    s.create_group("g", serde_json::json!({})).await;
    s.stop().await;

    let again = fleetgate_server::start(s.config.clone()).await.unwrap();
    assert_eq!(again.instance.id_scope, first.id_scope);
    // Ports are new (port 0) but names and keys are the same.
    let key = |c: &str| c.split(";SharedAccessKey=").nth(1).unwrap().to_owned();
    assert_eq!(again.instance.hubs.len(), first.hubs.len());
    assert_eq!(again.instance.hubs[0].host_name, first.hubs[0].host_name);
    assert_eq!(key(&again.instance.hubs[0].connection_string), key(&first.hubs[0].connection_string));
    assert_eq!(key(&again.instance.service_connection_string), key(&first.service_connection_string));
    assert_eq!(std::fs::read(s.dir.path().join("ca.pem")).unwrap(), ca);
    assert_eq!(
        std::fs::read(s.dir.path().join("server.pem")).unwrap(),
        cert,
        "unchanged host names keep the certificate"
    );
    assert_eq!(fleetgate_server::Instance::read(s.dir.path()).unwrap(), again.instance);
    s.server = Some(again);
    assert_eq!(s.service().list_enrollment_groups().await.unwrap().len(), 1, "state survived the restart");
    s.stop().await;

    // New host names: a new server certificate from the same CA.
    let mut c = s.config.clone();
    c.hostnames = vec!["fleetgate.test".into(), "127.0.0.1".into()];
    let third = fleetgate_server::start(c).await.unwrap();
    assert_eq!(third.instance.global_device_endpoint, "fleetgate.test");
    assert_ne!(std::fs::read(s.dir.path().join("server.pem")).unwrap(), cert);
    assert_eq!(std::fs::read(s.dir.path().join("ca.pem")).unwrap(), ca);
    third.shutdown().await;
}

#[tokio::test]
async fn instance_file_shape_and_ports_in_connection_strings() {
    let s = TestServer::start().await;
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("instance.json")).unwrap()).unwrap();
    let scope = v["idScope"].as_str().unwrap();
    fleetgate_core::ids::IdScope::parse(scope).unwrap();
    assert_eq!(v["globalDeviceEndpoint"], "localhost");
    let port = s.https_addr().port();
    assert!(v["serviceConnectionString"].as_str().unwrap().starts_with(&format!(
        "HostName=localhost:{port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="
    )));
    assert!(std::path::Path::new(v["caCertificate"].as_str().unwrap()).is_absolute());
    assert_eq!(v["hubs"][0]["hostName"], "localhost");
    assert!(v["hubs"][0]["connectionString"].as_str().unwrap().contains(";SharedAccessKeyName=iothubowner;"));
}

#[cfg(unix)]
#[tokio::test]
async fn secrets_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let s = fleetgate_server::start(config(dir.path())).await.unwrap();
    for f in ["ca.key", "server.key", "instance.json", "fleetgate.db"] {
        let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    s.shutdown().await;
}
