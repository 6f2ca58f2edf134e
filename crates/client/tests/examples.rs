//! Runs the crate's examples against a real server: the service example creates the group, the
//! device example provisions with the group key and sends telemetry, and the hub has it.
//! The examples are compiled in as modules so that their `run` is what is tested; their
//! argument parsing is checked with the same arguments a user would type.

mod common;

#[allow(dead_code)]
#[path = "../examples/enroll_group.rs"]
mod enroll_group;
#[allow(dead_code)]
#[path = "../examples/provision_and_send.rs"]
mod provision_and_send;

use std::time::Duration;

use common::Server;

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn provision_and_send_reaches_the_hub() {
    let s = Server::start(true).await;
    let ca = s.ca_path();
    let conn = s.running.instance.service_connection_string.clone();

    // The service example: creates the group (a second run finds it), returns its key.
    let settings = enroll_group::Settings::from_args(
        args(&["--connection-string", &conn, "--ca", &ca, "--group-id", "sensors", "--registration-id", "sensor-1"]),
        |_| None,
    )
    .unwrap();
    let group_key = enroll_group::run(&settings).await.unwrap();
    assert_eq!(enroll_group::run(&settings).await.unwrap(), group_key, "the existing group is kept");

    // The device example, with some options from the environment.
    let port = s.running.mqtt_addr.port().to_string();
    let scope = s.running.instance.id_scope.clone();
    let env = |k: &str| match k {
        "FLEETGATE_ID_SCOPE" => Some(scope.clone()),
        "FLEETGATE_MQTT_PORT" => Some(port.clone()),
        _ => None,
    };
    let settings = provision_and_send::Settings::from_args(
        args(&[
            "--registration-id",
            "sensor-1",
            "--group-key",
            &group_key,
            "--ca",
            &ca,
            "--host",
            "127.0.0.1",
            "--server-name",
            "localhost",
            "--messages",
            "3",
        ]),
        env,
    )
    .unwrap();
    let outcome = provision_and_send::run(&settings).await.unwrap();
    assert_eq!(outcome.sent, 3);
    assert_eq!(outcome.device_id, "sensor-1");
    assert_eq!(outcome.assigned_hub, s.running.instance.hubs[0].host_name);

    // The device is in the hub's registry and its registration record says where.
    let hub = s.hub_service();
    let device = hub.get_device("sensor-1").await.unwrap();
    assert_eq!(device.device_id, "sensor-1");
    assert_eq!(device.authentication.unwrap().kind, "sas");
    let record = s.service().get_registration("sensor-1").await.unwrap();
    assert_eq!(record.assigned_hub.as_deref(), Some(outcome.assigned_hub.as_str()));

    // The telemetry arrived, in order, with the example's properties.
    let mut events = Vec::new();
    hub.monitor_events(Some(0), Some("sensor-1"), Some(Duration::from_secs(10)), |e| {
        events.push(e);
        events.len() < 3
    })
    .await
    .unwrap();
    let ns: Vec<_> = events.iter().map(|e| e.event.payload["n"].as_i64()).collect();
    assert_eq!(ns, vec![Some(0), Some(1), Some(2)]);
    assert_eq!(events[0].event.properties.application["example"], "provision_and_send");
    assert_eq!(events[0].event.properties.system["content-type"], "application/json");
}

#[test]
fn missing_settings_are_named() {
    let e = provision_and_send::Settings::from_args(args(&["--registration-id", "x"]), |_| None).err().unwrap();
    assert!(e.contains("--group-key or --device-key"), "{e}");
    let e = provision_and_send::Settings::from_args(args(&["--group-key", "AAAA"]), |_| None).err().unwrap();
    assert!(e.contains("--registration-id (or FLEETGATE_REGISTRATION_ID)"), "{e}");
    let e = enroll_group::Settings::from_args(args(&["stray"]), |_| None).err().unwrap();
    assert!(e.contains("unexpected argument 'stray'"), "{e}");
}
