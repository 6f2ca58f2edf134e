//! `fleetgate simulate` against a `fleetgate serve` child process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fleetgate");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("FLEETGATE_CONNECTION_STRING")
        .env_remove("FLEETGATE_DATA_DIR")
        .env_remove("FLEETGATE_GROUP_KEY")
        .env_remove("FLEETGATE_MQTT_PORT")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

struct Served {
    child: Child,
    dir: tempfile::TempDir,
    mqtt_port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a server on random ports and reads the MQTT port from its banner.
fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--data-dir", dir.path().to_str().unwrap(), "--mqtt-port", "0", "--https-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // Keeps draining stdout so the server never blocks on it.
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("MQTT/TLS on ") {
                let addr = rest.split(',').next().unwrap_or_default();
                let _ = tx.send(addr.rsplit(':').next().unwrap_or_default().parse::<u16>().unwrap());
            }
        }
    });
    let mqtt_port = rx.recv_timeout(Duration::from_secs(20)).expect("server banner with the MQTT port");
    Served { child, dir, mqtt_port }
}

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
