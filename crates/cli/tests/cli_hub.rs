//! `fleetgate hub ...` verbs against a served instance, with telemetry from `fleetgate simulate`.

mod common;

use common::{json, run, serve, stdout};

#[test]
fn hub_verbs_mirror_az_iot_hub() {
    let s = serve();
    let d = s.dir();
    let port = s.mqtt_port.to_string();
    stdout(&run(&[
        "enrollment-group",
        "create",
        "--data-dir",
        d,
        "--group-id",
        "g",
        "--initial-twin",
        r#"{"tags":{"site":"lab"},"properties":{"desired":{"interval":30}}}"#,
    ]));
    let sim = stdout(&run(&[
        "simulate",
        "--data-dir",
        d,
        "--group-id",
        "g",
        "--devices",
        "2",
        "--messages",
        "3",
        "--mqtt-port",
        &port,
    ]));
    assert!(sim.contains("Sent 6 of 6 messages"), "{sim}");

    // Devices provisioned by DPS are in the hub registry, enabled.
    let list = json(&run(&["hub", "device-identity", "list", "--data-dir", d]));
    let mut ids: Vec<_> = list.as_array().unwrap().iter().map(|d| d["deviceId"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, ["sim-g-00000", "sim-g-00001"]);
    assert!(list.as_array().unwrap().iter().all(|d| d["status"] == "enabled"));
    // Keys only when asked for.
    assert!(list.as_array().unwrap().iter().all(|d| d["authentication"]["symmetricKey"]["primaryKey"].is_null()));
    let with_keys = json(&run(&["hub", "device-identity", "list", "--data-dir", d, "--show-keys"]));
    assert!(with_keys
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["authentication"]["symmetricKey"]["primaryKey"].is_string()));

    // Replayed telemetry, az's shape, with properties.
    let o = run(&[
        "hub",
        "monitor-events",
        "--data-dir",
        d,
        "--from",
        "1",
        "--timeout",
        "2",
        "--properties",
        "all",
        "--device-id",
        "sim-g-00001",
    ]);
    let text = stdout(&o);
    let events: Vec<serde_json::Value> =
        serde_json::Deserializer::from_str(&text).into_iter().map(|v| v.unwrap()).collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(events.iter().all(|e| e["event"]["origin"] == "sim-g-00001"));
    assert!(events[0]["event"]["properties"]["system"].is_object());
    assert!(events[0]["event"]["annotations"]["iothub-enqueuedtime"].is_string());

    // Twins: the enrollment's initial twin, then a desired patch.
    let twin = json(&run(&["hub", "device-twin", "show", "--data-dir", d, "--device-id", "sim-g-00000"]));
    assert_eq!(twin["tags"]["site"], "lab");
    assert_eq!(twin["properties"]["desired"]["interval"], 30);
    let twin = json(&run(&[
        "hub",
        "device-twin",
        "update",
        "--data-dir",
        d,
        "--device-id",
        "sim-g-00000",
        "--desired",
        r#"{"interval":60}"#,
    ]));
    assert_eq!(twin["properties"]["desired"]["$version"], 2);

    // C2D to a known device is queued; to an unknown one it is a 404001.
    stdout(&run(&[
        "hub",
        "c2d-message",
        "send",
        "--data-dir",
        d,
        "--device-id",
        "sim-g-00000",
        "--data",
        "hi",
        "--props",
        "a=1;b=2",
    ]));
    let o = run(&["hub", "c2d-message", "send", "--data-dir", d, "--device-id", "nobody"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("404001"));

    // The simulated devices have disconnected: a method call says so.
    let o = run(&[
        "hub",
        "invoke-device-method",
        "--data-dir",
        d,
        "--device-id",
        "sim-g-00000",
        "--method-name",
        "reboot",
        "--timeout",
        "5",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("404103"));

    // Identity lifecycle.
    let created = json(&run(&["hub", "device-identity", "create", "--data-dir", d, "--device-id", "manual-1"]));
    assert_eq!(created["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().len(), 88);
    let updated = json(&run(&[
        "hub",
        "device-identity",
        "update",
        "--data-dir",
        d,
        "--device-id",
        "manual-1",
        "--status",
        "disabled",
    ]));
    assert_eq!(updated["status"], "disabled");
    stdout(&run(&["hub", "device-identity", "delete", "--data-dir", d, "--device-id", "manual-1"]));
    assert!(!run(&["hub", "device-identity", "show", "--data-dir", d, "--device-id", "manual-1"]).status.success());

    // Linked hubs. A second hub named by an address the certificate covers, so the CLI can
    // reach it here without DNS.
    let hub = json(&run(&["hub", "create", "--data-dir", d, "--hostname", "127.0.0.1"]));
    assert_eq!(hub["hostName"], "127.0.0.1");
    let hubs = json(&run(&["hub", "list", "--data-dir", d]));
    assert_eq!(hubs.as_array().unwrap().len(), 2);
    assert!(!run(&["hub", "create", "--data-dir", d, "--hostname", "LOCALHOST"]).status.success());
    // The new hub's own key opens its registry (empty), through the same listener.
    let empty = json(&run(&["hub", "device-identity", "list", "--data-dir", d, "--hub-name", "127.0.0.1"]));
    assert_eq!(empty, serde_json::json!([]));
}

/// Runs `fleetgate serve` with `args` where it must stop by itself (refused at start): its
/// output, or a panic if it is still running after a minute (then it started, which it must not).
fn serve_refused(args: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(common::BIN)
        .arg("serve")
        .args(args)
        .env_remove("FLEETGATE_DATA_DIR")
        .env_remove("FLEETGATE_MQTT_PORT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second `serve` started: {:?}", child.wait_with_output().unwrap());
        }
        // Backoff between polls.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `serve --hostname 127.0.0.1` names its hub 127.0.0.1 (not `localhost`, which the
/// certificate would not cover), and the hub CLI dials that name. A second `serve` on the same
/// data directory, with other host names, is refused naming the first one's pid, and leaves the
/// certificate the first one serves alone.
#[test]
fn the_hub_is_named_after_the_first_hostname_and_the_directory_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let server = common::Server::start_with(dir.path(), &["--hostname", "127.0.0.1"]);
    let inst: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("instance.json")).unwrap()).unwrap();
    assert_eq!(inst["hubs"][0]["hostName"], "127.0.0.1", "{inst}");
    assert_eq!(json(&run(&["hub", "device-identity", "list", "--data-dir", d])), serde_json::json!([]));

    let cert = std::fs::read(dir.path().join("server.pem")).unwrap();
    let o = serve_refused(&["--data-dir", d, "--mqtt-port", "0", "--https-port", "0", "--hostname", "other.test"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("is in use by pid {} (fleetgate serve)", server.child.id())), "{err}");
    assert_eq!(std::fs::read(dir.path().join("server.pem")).unwrap(), cert, "the running server's certificate");
    // The first server still serves.
    assert_eq!(json(&run(&["hub", "device-identity", "list", "--data-dir", d])), serde_json::json!([]));

    // Its own ports taken: refused before the data directory is touched.
    let (mqtt, https) = (server.mqtt_port.to_string(), server.https_port.to_string());
    let o = serve_refused(&["--data-dir", d, "--mqtt-port", &mqtt, "--https-port", &https, "--hostname", "other.test"]);
    assert!(!o.status.success());
    assert_eq!(std::fs::read(dir.path().join("server.pem")).unwrap(), cert);
    drop(server);
}

/// `linked-hub delete` unlinks a hub without device identities (and `instance.json` follows);
/// the only hub, one with devices, or an unknown name are refused with the reason.
#[test]
fn linked_hub_delete() {
    let s = serve();
    let d = s.dir();
    let err = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(run(&["linked-hub", "delete", "--data-dir", d, "--hostname", "localhost"]));
    assert!(e.contains("only hub"), "{e}");
    json(&run(&["linked-hub", "create", "--data-dir", d, "--hostname", "127.0.0.1"]));
    json(&run(&["hub", "device-identity", "create", "--data-dir", d, "--device-id", "dev-1"]));
    let e = err(run(&["linked-hub", "delete", "--data-dir", d, "--hostname", "LOCALHOST"]));
    assert!(e.contains("has 1 device identities"), "{e}");
    let e = err(run(&["linked-hub", "delete", "--data-dir", d, "--hostname", "nowhere.test"]));
    assert!(e.contains("no linked hub named 'nowhere.test'"), "{e}");

    json(&run(&["linked-hub", "delete", "--data-dir", d, "--hostname", "127.0.0.1"]));
    let hubs = json(&run(&["linked-hub", "list", "--data-dir", d]));
    assert_eq!(hubs.as_array().unwrap().len(), 1, "{hubs}");
    assert_eq!(hubs[0]["name"], "localhost");
    let inst: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("instance.json")).unwrap()).unwrap();
    assert_eq!(inst["hubs"].as_array().unwrap().len(), 1, "{inst}");
    // Nor does the hub CLI find it any more.
    assert!(!run(&["hub", "device-identity", "list", "--data-dir", d, "--hub-name", "127.0.0.1"]).status.success());
}

/// Telemetry from `count` new simulated devices of group `g`, one message each.
fn simulate(d: &str, port: &str, start: usize) {
    let start = start.to_string();
    let o = run(&[
        "simulate",
        "--data-dir",
        d,
        "--group-id",
        "g",
        "--devices",
        "1",
        "--start-index",
        &start,
        "--messages",
        "1",
        "--mqtt-port",
        port,
    ]);
    assert!(stdout(&o).contains("Sent 1 of 1"));
}

#[test]
fn monitor_events_timeout_counts_from_the_last_message_and_zero_is_forever() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let s = serve();
    let d = s.dir();
    let port = s.mqtt_port.to_string();
    stdout(&run(&["enrollment-group", "create", "--data-dir", d, "--group-id", "g"]));

    let bad = run(&["hub", "monitor-events", "--data-dir", d, "--properties", "sys", "bogus"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--properties"));

    // Messages 3 s apart, the last well past 5 s after the start: a timeout of 5 s counted
    // from the start would miss it.
    let monitor = Command::new(common::BIN)
        .args(["hub", "monitor-events", "--data-dir", d, "--from", "1", "--timeout", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for i in 0..3 {
        if i > 0 {
            // Time must pass: the timeout is counted from the last message.
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        simulate(d, &port, i);
    }
    let text = String::from_utf8(monitor.wait_with_output().unwrap().stdout).unwrap();
    let origins: Vec<String> = serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map(|v| v.unwrap()["event"]["origin"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(origins, ["sim-g-00000", "sim-g-00001", "sim-g-00002"]);

    // 0: still following once everything stored has been printed.
    let mut monitor = Command::new(common::BIN)
        .args(["hub", "monitor-events", "--data-dir", d, "--from", "1", "--timeout", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(monitor.stdout.take().unwrap());
    let mut seen = 0;
    let mut line = String::new();
    while seen < 3 {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "monitor-events --timeout 0 stopped");
        if line.contains("\"origin\"") {
            seen += 1;
        }
    }
    // Time must pass: that it does not stop can only be seen by letting time go by.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(monitor.try_wait().unwrap().is_none(), "monitor-events --timeout 0 stopped");
    monitor.kill().unwrap();
    monitor.wait().unwrap();
}
