//! The data directory: created once, reused after, secrets private.

mod common;

use common::TestServer;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;

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

/// Every file in the data directory is owner-only (0600) and every directory 0700: the
/// databases with their -wal/-shm, the audit trail, the telemetry log, certificates and keys. A
/// directory made with looser modes is tightened at start.
#[cfg(unix)]
#[tokio::test]
async fn every_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    fn check(dir: &std::path::Path, seen: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            if p.is_dir() {
                assert_eq!(mode, 0o700, "{}", p.display());
                check(&p, seen);
            } else {
                assert_eq!(mode, 0o600, "{}", p.display());
            }
            seen.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    let mut s = TestServer::start().await;
    let key = s.create_device("dev-1").await;
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 1, b"t").await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let mut seen = Vec::new();
    check(s.dir.path(), &mut seen);
    for f in ["ca.key", "ca.pem", "server.key", "server.pem", "instance.json", "fleetgate.db", "telemetry.db", "events"]
    {
        assert!(seen.iter().any(|n| n == f), "{f} in {seen:?}");
    }
    assert!(seen.iter().any(|n| n.ends_with("-wal")) && seen.iter().any(|n| n.ends_with(".events")), "{seen:?}");
    s.stop().await;

    let loosen =
        |p: &std::path::Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    loosen(&s.dir.path().join("ca.pem"), 0o644);
    loosen(&s.dir.path().join("telemetry.db"), 0o644);
    loosen(&s.dir.path().join("events"), 0o755);
    s.server = Some(fleetgate_server::start(s.config.clone()).await.unwrap());
    check(s.dir.path(), &mut Vec::new());
    s.stop().await;
}

/// Once a data directory holds an instance, a missing or emptied piece stops the start with an
/// error naming the file, and nothing is made anew: not the ID scope, not the CA, not
/// instance.json. Put back, the same instance starts.
#[tokio::test]
async fn an_initialized_directory_missing_a_piece_refuses_to_start() {
    let mut s = TestServer::start().await;
    s.create_group("g", serde_json::json!({})).await;
    let key = s.create_device("dev-1").await;
    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 1, b"t").await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let scope = s.scope();
    s.stop().await;
    let dir = s.dir.path().to_owned();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let (instance, ca, ca_key, db) = (read("instance.json"), read("ca.pem"), read("ca.key"), read("fleetgate.db"));

    let refused = |what: &'static str| {
        let config = s.config.clone();
        let dir = dir.clone();
        let instance = instance.clone();
        let ca = ca.clone();
        async move {
            let err = match fleetgate_server::start(config).await {
                Ok(_) => panic!("{what}: started anyway"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("Restore") && err.contains("backup"), "{what}: {err}");
            if dir.join("instance.json").exists() {
                assert_eq!(std::fs::read(dir.join("instance.json")).unwrap(), instance, "{what}: instance.json kept");
            }
            if let Ok(now) = std::fs::read(dir.join("ca.pem")) {
                assert!(now == ca || now.is_empty(), "{what}: no new CA");
            }
            err
        }
    };

    std::fs::write(dir.join("fleetgate.db"), b"").unwrap();
    let err = refused("emptied fleetgate.db").await;
    assert!(err.contains("fleetgate.db is empty"), "{err}");
    std::fs::remove_file(dir.join("fleetgate.db")).unwrap();
    let err = refused("deleted fleetgate.db").await;
    assert!(err.contains("fleetgate.db is missing"), "{err}");
    assert!(!dir.join("fleetgate.db").exists(), "not created");
    std::fs::write(dir.join("fleetgate.db"), &db).unwrap();

    for f in ["ca.pem", "ca.key"] {
        let bytes = read(f);
        std::fs::remove_file(dir.join(f)).unwrap();
        let err = refused("deleted CA file").await;
        assert!(err.contains(&format!("{f} is missing")), "{err}");
        assert!(!dir.join(f).exists(), "no new CA");
        std::fs::write(dir.join(f), b"").unwrap();
        let err = refused("emptied CA file").await;
        assert!(err.contains(&format!("{f} is empty")), "{err}");
        std::fs::write(dir.join(f), bytes).unwrap();
    }

    // Another instance's registry (here: this one's with another ID scope).
    let store = fleetgate_store::SqliteStore::open(&dir.join("fleetgate.db")).unwrap();
    fleetgate_store::InstanceStore::set_setting(&store, "id_scope", "0ne99999999").await.unwrap();
    let err = refused("another instance's registry").await;
    assert!(err.contains("belongs to another instance"), "{err}");
    fleetgate_store::InstanceStore::set_setting(&store, "id_scope", &scope).await.unwrap();
    drop(store);

    // instance.json deleted and the registry emptied, the CA still there.
    std::fs::remove_file(dir.join("instance.json")).unwrap();
    std::fs::write(dir.join("fleetgate.db"), b"").unwrap();
    let err = refused("no instance.json, emptied registry").await;
    assert!(err.contains("fleetgate.db is empty") && err.contains("CA"), "{err}");
    assert!(!dir.join("instance.json").exists());

    // ... and with the CA gone as well, the telemetry log still shows the earlier instance.
    let ca_bytes = (read("ca.pem"), read("ca.key"));
    std::fs::remove_file(dir.join("ca.pem")).unwrap();
    let err = refused("no instance.json, no CA, emptied registry, telemetry kept").await;
    assert!(err.contains("fleetgate.db is empty") && err.contains("events/"), "{err}");
    std::fs::write(dir.join("ca.pem"), &ca_bytes.0).unwrap();

    // Everything put back: the same instance, its group still there.
    std::fs::write(dir.join("fleetgate.db"), &db).unwrap();
    std::fs::write(dir.join("instance.json"), &instance).unwrap();
    assert_eq!((read("ca.pem"), read("ca.key")), (ca.clone(), ca_key));
    s.server = Some(fleetgate_server::start(s.config.clone()).await.unwrap());
    assert_eq!(s.scope(), scope);
    assert_eq!(s.service().list_enrollment_groups().await.unwrap().len(), 1);
    s.stop().await;
}

/// Below the free-space reserve a device's telemetry gets no PUBACK (the connection closes and
/// the SDK sends it again), a registration gets 503 with a retry-after, and a service change 503:
/// retryable refusals before the disk is full, nothing written.
#[tokio::test]
async fn below_the_disk_reserve_writes_are_refused_retryably() {
    let mut s = TestServer::start().await;
    let (group_key, _) = s.create_group("g", serde_json::json!({})).await;
    let key = s.create_device("dev-1").await;
    s.stop().await;
    let mut c = s.config.clone();
    c.disk_reserve_bytes = Some(u64::MAX / 2);
    s.server = Some(fleetgate_server::start(c).await.expect("an initialized directory starts without writing"));

    let mut m = s.hub_device("dev-1", &key).await.unwrap();
    m.publish("devices/dev-1/messages/events/", QoS::AtLeastOnce, 7, b"t").await;
    assert!(m.recv().await.is_none(), "no PUBACK: the connection closes");
    assert!(s.stored_events().await.is_empty());

    let device_key = group_key.derive_device_key("reg-1");
    let (topic, body) = s.register("reg-1", &device_key, None).await;
    assert!(topic.starts_with("$dps/registrations/res/503/"), "{topic} {body}");
    assert!(topic.contains("retry-after="), "{topic}");
    assert_eq!(body["errorCode"], 503000);

    let err = s
        .service()
        .put_enrollment_group(
            &serde_json::json!({"enrollmentGroupId": "g2", "attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    let metrics = s.http().get(s.url("/metrics")).header("Authorization", s.service_token()).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("fleetgate_disk_reserve_refusals_total{kind=\"telemetry\"}"), "{metrics}");
    s.stop().await;
}

/// A clean stop leaves everything in the `.db` files: copies of `fleetgate.db` and `telemetry.db`
/// without their `-wal` (a backup that took only the databases) hold the instance, the group
/// created and its audit entry.
#[tokio::test]
async fn a_clean_stop_leaves_everything_in_the_db_files() {
    use rusqlite::{Connection, OpenFlags};
    let mut s = TestServer::start().await;
    let scope = s.scope();
    s.create_group("kept-group", serde_json::json!({})).await;
    // Connections open beside the server (an operator's sqlite3 shell, a backup tool), as in a
    // process that exits: SQLite's own checkpoint when the last connection closes never runs.
    let beside: Vec<Connection> = ["fleetgate.db", "telemetry.db"]
        .iter()
        .map(|f| {
            let c = Connection::open_with_flags(s.dir.path().join(f), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            // A first read opens the WAL; the connection holds it (and a shared lock) from then on.
            c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)).unwrap();
            c
        })
        .collect();
    s.stop().await;

    let copy = tempfile::tempdir().unwrap();
    for file in ["fleetgate.db", "telemetry.db"] {
        std::fs::copy(s.dir.path().join(file), copy.path().join(file)).unwrap();
    }
    drop(beside);
    let registry = Connection::open(copy.path().join("fleetgate.db")).unwrap();
    let stored_scope: String =
        registry.query_row("SELECT value FROM settings WHERE key = 'id_scope'", [], |r| r.get(0)).unwrap();
    assert_eq!(stored_scope, scope);
    let groups: i64 = registry
        .query_row("SELECT COUNT(*) FROM enrollment_groups WHERE id_key = 'kept-group'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(groups, 1, "the group is in fleetgate.db itself");
    let audit = Connection::open(copy.path().join("telemetry.db")).unwrap();
    let entries: i64 =
        audit.query_row("SELECT COUNT(*) FROM audit WHERE body LIKE '%kept-group%'", [], |r| r.get(0)).unwrap();
    assert!(entries >= 1, "the group's audit entry is in telemetry.db itself");
}

/// The hub made on first start is named after the first host name (the certificate's), not
/// `localhost`; a later start asking for a hub name the instance does not have is refused (the
/// devices were told the existing name), one naming an existing hub starts.
#[tokio::test]
async fn the_hub_is_named_after_the_first_hostname_and_keeps_its_name() {
    let mut s = TestServer::start_with(|c| c.hostnames = vec!["fleetgate.test".into(), "127.0.0.1".into()]).await;
    assert_eq!(s.running().instance.hubs.len(), 1);
    assert_eq!(s.running().instance.hubs[0].host_name, "fleetgate.test");
    s.stop().await;

    let mut c = s.config.clone();
    c.hub_hostname = Some("other.test".into());
    let e = fleetgate_server::start(c.clone()).await.err().expect("an unknown hub name is refused").to_string();
    assert!(e.contains("--hub-hostname other.test") && e.contains("hub is named fleetgate.test"), "{e}");
    c.hub_hostname = Some("FLEETGATE.test".into());
    let again = fleetgate_server::start(c).await.unwrap();
    assert_eq!(again.instance.hubs.len(), 1);
    assert_eq!(again.instance.hubs[0].host_name, "fleetgate.test");
    again.shutdown().await;
}

/// A second server on a data directory in use changes nothing in it: on the same ports it fails
/// to bind before the certificate would be reissued for its host names (the running server
/// would reload it); on other ports the directory's lock refuses it, naming the holder. Once the
/// first has stopped, the directory is free.
#[tokio::test]
async fn a_second_server_on_a_directory_in_use_is_refused_and_changes_nothing() {
    let mut s = TestServer::start().await;
    let cert = std::fs::read(s.dir.path().join("server.pem")).unwrap();
    let instance = std::fs::read(s.dir.path().join("instance.json")).unwrap();
    let mut other = s.config.clone();
    other.hostnames = vec!["other.test".into()];
    other.mqtt_port = s.mqtt_addr().port();
    other.https_port = s.https_addr().port();
    let e = fleetgate_server::start(other.clone()).await.err().expect("the ports are taken");
    assert!(matches!(e, fleetgate_server::StartError::Bind { .. }), "{e}");
    assert_eq!(std::fs::read(s.dir.path().join("server.pem")).unwrap(), cert);

    other.mqtt_port = 0;
    other.https_port = 0;
    let e = fleetgate_server::start(other.clone()).await.err().expect("the directory is in use").to_string();
    assert!(e.contains(&format!("is in use by pid {} (fleetgate serve)", std::process::id())), "{e}");
    assert_eq!(std::fs::read(s.dir.path().join("server.pem")).unwrap(), cert);
    assert_eq!(std::fs::read(s.dir.path().join("instance.json")).unwrap(), instance);

    s.stop().await;
    let next = fleetgate_server::start(other).await.unwrap();
    assert_eq!(next.instance.global_device_endpoint, "other.test");
    next.shutdown().await;
}
