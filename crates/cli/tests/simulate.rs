//! `fleetgate simulate` against a `fleetgate serve` child process.

mod common;

use common::{run, serve, stdout};

#[test]
fn simulate_provisions_a_group_of_devices() {
    let s = serve();
    let d = s.dir.path().to_str().unwrap();
    let port = s.mqtt_port.to_string();
    stdout(&run(&["enrollment-group", "create", "--data-dir", d, "--group-id", "grp-sim"]));

    let o = run(&[
        "simulate",
        "--data-dir",
        d,
        "--group-id",
        "grp-sim",
        "--devices",
        "20",
        "--messages",
        "0",
        "--concurrency",
        "5",
        "--mqtt-port",
        &port,
    ]);
    let out = stdout(&o);
    assert!(out.contains("Provisioned 20 of 20 devices"), "{out}");
    assert!(out.contains("Failures: none"), "{out}");

    let regs: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["registration", "list", "--data-dir", d, "--group-id", "grp-sim"])))
            .unwrap();
    let regs = regs.as_array().unwrap();
    assert_eq!(regs.len(), 20);
    assert!(regs.iter().all(|r| r["status"] == "assigned"));
    assert!(regs.iter().any(|r| r["registrationId"] == "sim-grp-sim-00019"));

    // Five more devices, each sending telemetry to its hub (QoS 1, acknowledged).
    let o = run(&[
        "simulate",
        "--data-dir",
        d,
        "--group-id",
        "grp-sim",
        "--devices",
        "5",
        "--start-index",
        "20",
        "--messages",
        "3",
        "--payload-bytes",
        "300",
        "--mqtt-port",
        &port,
    ]);
    let out = stdout(&o);
    assert!(out.contains("Provisioned 5 of 5 devices") && out.contains("Sent 15 of 15 messages"), "{out}");

    // A wrong group key: every device fails with 401002, reported by reason, exit code non-zero.
    let o = run(&[
        "simulate",
        "--data-dir",
        d,
        "--group-id",
        "grp-sim",
        "--devices",
        "3",
        "--start-index",
        "100",
        "--group-key",
        "AAECAwQFBgcICQoLDA0ODw==",
        "--mqtt-port",
        &port,
    ]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Provisioned 0 of 3 devices"), "{out}");
    assert!(out.contains("provisioning: 401002 ") && out.contains(": 3"), "{out}");
}

/// Simulated devices connect to the hub DPS assigned them by that hub's name, as real devices
/// do: a hub named 127.0.0.2, where nothing listens, fails them (dialling `--host` instead
/// would hide that devices cannot reach their hub).
#[test]
fn simulated_devices_dial_their_assigned_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let server = common::Server::start_with(dir.path(), &["--hub-hostname", "127.0.0.2"]);
    let port = server.mqtt_port.to_string();
    stdout(&run(&["enrollment-group", "create", "--data-dir", d, "--group-id", "grp-far"]));
    let o = run(&[
        "simulate",
        "--data-dir",
        d,
        "--group-id",
        "grp-far",
        "--devices",
        "1",
        "--messages",
        "1",
        "--timeout",
        "10",
        "--mqtt-port",
        &port,
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("Provisioned 1 of 1 devices") && out.contains("Sent 0 of 1 messages"), "{out}");
    assert!(out.contains("hub: "), "{out}");
}
