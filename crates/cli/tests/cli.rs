//! The `fleetgate` binary as a user runs it.

mod common;

use std::process::{Command, Stdio};

use common::{run, serve, stdout};

#[test]
fn compute_device_key_matches_az_and_the_published_vector() {
    let o = run(&[
        "compute-device-key",
        "--key",
        "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        "--registration-id",
        "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
    ]);
    assert_eq!(stdout(&o), "\"Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=\"\n");
}

#[test]
fn compute_device_key_equals_openssl_hmac() {
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    for id in ["dev-001", "Device.A_b:9-", "x"] {
        let hex: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
        let mut child = Command::new("openssl")
            .args(["sha256", "-mac", "HMAC", "-macopt", &format!("hexkey:{hex}"), "-binary"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl is needed for this check");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(id.as_bytes()).unwrap();
        let mac = child.wait_with_output().unwrap().stdout;
        use base64::Engine;
        let expected = base64::engine::general_purpose::STANDARD.encode(mac);
        let o = run(&["compute-device-key", "--key", key, "--registration-id", id]);
        assert_eq!(stdout(&o).trim(), format!("\"{expected}\""), "{id}");
    }
}

#[test]
fn compute_device_keys_for_a_factory_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("ids.txt");
    std::fs::write(&f, "dev-001\n\nDEV-001\n").unwrap();
    let o = run(&[
        "compute-device-key",
        "--key",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "--registration-ids-file",
        f.to_str().unwrap(),
    ]);
    assert_eq!(
        stdout(&o),
        "registrationId,derivedKey\ndev-001,SV+2SImDP9Vx9XL3ACWx9N9ZFlb6ue3jKrTWmct/YVk=\nDEV-001,+SqoroNDLb0K5J+ZQaqNSTp2B1TS7Lh3fBSsfnd+dPs=\n"
    );
    std::fs::write(&f, "ok-1\nbad id\n").unwrap();
    let o = run(&[
        "compute-device-key",
        "--key",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "--registration-ids-file",
        f.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(":2:"), "names the bad line");
    let o = run(&["compute-device-key", "--key", "%%%", "--registration-id", "x"]);
    assert!(!o.status.success());
}

#[test]
fn enrollment_group_and_registration_verbs_against_a_server() {
    let s = serve();
    let d = s.dir();
    let info = stdout(&run(&["info", "--data-dir", d]));
    assert!(info.contains("ID scope:") && info.contains("provisioningserviceowner"));

    let created: serde_json::Value = serde_json::from_str(&stdout(&run(&[
        "enrollment-group",
        "create",
        "--data-dir",
        d,
        "--group-id",
        "grp-1",
        "--iot-hub",
        "localhost",
        "--initial-twin",
        r#"{"tags":{"site":"lab"},"properties":{"desired":{"interval":30}}}"#,
    ])))
    .unwrap();
    assert_eq!(created["iotHubHostName"], "localhost");
    assert_eq!(created["allocationPolicy"], "static");
    let primary = created["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();

    // Creating it again is refused.
    let again = run(&["enrollment-group", "create", "--data-dir", d, "--group-id", "grp-1"]);
    assert!(!again.status.success());

    let shown: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["enrollment-group", "show", "--data-dir", d, "--group-id", "grp-1"])))
            .unwrap();
    assert_eq!(shown["attestation"]["symmetricKey"], serde_json::json!({}));
    let keys: serde_json::Value = serde_json::from_str(&stdout(&run(&[
        "enrollment-group",
        "show",
        "--data-dir",
        d,
        "--group-id",
        "grp-1",
        "--show-keys",
    ])))
    .unwrap();
    assert_eq!(keys["attestation"]["symmetricKey"]["primaryKey"], primary.as_str());

    let upd: serde_json::Value = serde_json::from_str(&stdout(&run(&[
        "enrollment-group",
        "update",
        "--data-dir",
        d,
        "--group-id",
        "grp-1",
        "--provisioning-status",
        "disabled",
    ])))
    .unwrap();
    assert_eq!(upd["provisioningStatus"], "disabled");
    let stale = run(&[
        "enrollment-group",
        "update",
        "--data-dir",
        d,
        "--group-id",
        "grp-1",
        "--provisioning-status",
        "enabled",
        "--etag",
        "\"stale\"",
    ]);
    assert!(!stale.status.success());
    assert!(String::from_utf8_lossy(&stale.stderr).contains("412"));

    let list: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["enrollment-group", "list", "--data-dir", d]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let regs: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["registration", "list", "--data-dir", d, "--group-id", "grp-1"]))).unwrap();
    assert_eq!(regs, serde_json::json!([]));
    let missing = run(&["registration", "show", "--data-dir", d, "--registration-id", "nobody"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404201"));

    // A connection string with the wrong key is refused by the service.
    let inst: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("instance.json")).unwrap()).unwrap();
    let cs = inst["serviceConnectionString"].as_str().unwrap();
    let bad = cs.split(";SharedAccessKey=").next().unwrap().to_owned() + ";SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==";
    let o = run(&[
        "enrollment-group",
        "list",
        "--connection-string",
        &bad,
        "--ca-cert",
        inst["caCertificate"].as_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("401002"));

    assert!(run(&["enrollment-group", "delete", "--data-dir", d, "--group-id", "grp-1"]).status.success());
    assert!(!run(&["enrollment-group", "show", "--data-dir", d, "--group-id", "grp-1"]).status.success());
}

/// `serve` with each `--flag=value` exits non-zero naming the flag, before creating anything.
fn assert_serve_refuses(cases: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    for (flag, bad) in cases {
        let o = run(&["serve", "--data-dir", d.to_str().unwrap(), &format!("{flag}={bad}")]);
        assert!(!o.status.success(), "{flag}={bad} accepted");
        assert!(String::from_utf8_lossy(&o.stderr).contains(flag), "{flag}={bad}: names the flag");
    }
    assert!(!d.exists(), "nothing was created");
}

/// Connection limits that would stop the server serving anyone (no connections, no time for a
/// request, no memory for a packet) are refused before anything starts.
#[test]
fn serve_refuses_limits_that_admit_nothing() {
    assert_serve_refuses(&[
        ("--max-connections", "0"),
        ("--max-connections-per-source", "-1"),
        ("--unauthenticated-timeout-secs", "0"),
        ("--http-header-timeout-secs", "0"),
        ("--http-body-timeout-secs", "0"),
        ("--write-timeout-secs", "0"),
        ("--partial-packet-budget-mib", "0"),
        ("--partial-packet-timeout-secs", "0"),
        ("--http-body-timeout-secs", "forever"),
    ]);
}

/// Telemetry retention is 1 hour to a year: zero, negative or absurd values are refused before
/// anything starts.
#[test]
fn serve_refuses_a_retention_out_of_range() {
    let flag = "--event-retention-hours";
    assert_serve_refuses(&[(flag, "0"), (flag, "-1"), (flag, "8761"), (flag, "a day")]);
}

/// Sizes are bytes or K/M/G/T; anything else is refused before anything starts, naming the flag.
#[test]
fn serve_refuses_a_bad_size() {
    assert_serve_refuses(&[
        ("--event-retention-bytes", "lots"),
        ("--disk-reserve-bytes", "5X"),
        ("--disk-reserve-bytes", "-1"),
    ]);
}

/// Runs `serve` on `dir`, which must stop by itself (a refused start); its status and stderr.
fn serve_refused(dir: &std::path::Path) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(common::BIN)
        .args(["serve", "--data-dir", dir.to_str().unwrap(), "--mqtt-port", "0", "--https-port", "0"])
        .env_remove("FLEETGATE_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve kept running on a damaged data directory");
        }
        // Backoff between polls.
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// `serve` on a data directory that lost its CA exits non-zero, naming the file and what to do,
/// and makes no new CA.
#[test]
fn serve_stops_on_a_data_directory_missing_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    common::Server::start(dir.path()).kill9();
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let (status, stderr) = serve_refused(dir.path());
    assert!(!status.success());
    assert!(stderr.contains("ca.key is missing") && stderr.contains("backup"), "{stderr}");
    assert!(!dir.path().join("ca.key").exists(), "no new CA");
}

/// The issue's reproduction: killed, then the registry's -wal deleted (its changes never reached
/// the database file): `serve` refuses instead of starting a new instance over the old one.
#[test]
fn serve_stops_on_a_registry_that_lost_its_wal() {
    let dir = tempfile::tempdir().unwrap();
    common::Server::start(dir.path()).kill9();
    let instance = std::fs::read(dir.path().join("instance.json")).unwrap();
    std::fs::remove_file(dir.path().join("fleetgate.db-wal")).unwrap();
    let _ = std::fs::remove_file(dir.path().join("fleetgate.db-shm"));
    let (status, stderr) = serve_refused(dir.path());
    assert!(!status.success());
    assert!(stderr.contains("fleetgate.db has no instance settings"), "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("instance.json")).unwrap(), instance, "instance.json kept");
}

/// SIGTERM stops `serve` cleanly with its data in the `.db` files themselves: copies of
/// `fleetgate.db` and `telemetry.db` without their `-wal` (a backup that took only the databases)
/// hold the group created and its audit entry.
#[test]
fn sigterm_leaves_everything_in_the_db_files() {
    use rusqlite::{Connection, OpenFlags};
    let mut s = serve();
    let d = s.dir().to_owned();
    stdout(&run(&["enrollment-group", "create", "--data-dir", &d, "--group-id", "kept-group"]));
    // Connections open beside the server (an operator's sqlite3 shell, a backup tool): SQLite's
    // own checkpoint when the last connection closes cannot run, whatever the exit races.
    let beside: Vec<Connection> = ["fleetgate.db", "telemetry.db"]
        .iter()
        .map(|f| {
            let c = Connection::open_with_flags(s.dir.path().join(f), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            // A first read opens the WAL; the connection holds it (and a shared lock) from then on.
            c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)).unwrap();
            c
        })
        .collect();
    assert!(s.server.terminate().success(), "a clean stop exits 0");

    let copy = tempfile::tempdir().unwrap();
    for file in ["fleetgate.db", "telemetry.db"] {
        std::fs::copy(s.dir.path().join(file), copy.path().join(file)).unwrap();
    }
    drop(beside);
    let registry = Connection::open(copy.path().join("fleetgate.db")).unwrap();
    let groups: i64 = registry
        .query_row("SELECT COUNT(*) FROM enrollment_groups WHERE id_key = 'kept-group'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(groups, 1, "the group is in fleetgate.db itself");
    let audit = Connection::open(copy.path().join("telemetry.db")).unwrap();
    let entries: i64 =
        audit.query_row("SELECT COUNT(*) FROM audit WHERE body LIKE '%kept-group%'", [], |r| r.get(0)).unwrap();
    assert!(entries >= 1, "the group's audit entry is in telemetry.db itself");
}

/// The admin verbs go through the running server (the one path that changes hubs, policies and
/// the audit trail): with the server stopped they say so, and the data directory is left as it was.
#[test]
fn admin_verbs_need_the_running_server() {
    let mut s = serve();
    assert!(s.server.terminate().success());
    let d = s.dir().to_owned();
    let before = std::fs::read(s.dir.path().join("instance.json")).unwrap();
    for args in [
        &["hub", "create", "--data-dir", &d, "--hostname", "extra.test"][..],
        &["linked-hub", "update", "--data-dir", &d, "--hostname", "extra.test", "--allocation-weight", "7"],
        &["linked-hub", "list", "--data-dir", &d],
        &["policy", "renew-key", "--data-dir", &d, "--name", "provisioningserviceowner"],
        &["audit", "--data-dir", &d],
    ] {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} succeeded without a server");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("is `fleetgate serve` running"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(s.dir.path().join("instance.json")).unwrap(), before, "instance.json unchanged");
    let registry = rusqlite::Connection::open(s.dir.path().join("fleetgate.db")).unwrap();
    let hubs: i64 = registry.query_row("SELECT COUNT(*) FROM hubs", [], |r| r.get(0)).unwrap();
    assert_eq!(hubs, 1, "no hub was linked");
}

/// Telemetry event `n` of hub `h`, device `d`: a 1,000-byte body of `n`.
fn test_event(n: usize) -> fleetgate_core::message::ReceivedEvent {
    fleetgate_core::message::ReceivedEvent {
        hub: "h".into(),
        device_id: "d".into(),
        enqueued_time: fleetgate_core::time::Timestamp::now(),
        bag: String::new(),
        connection: None,
        body: vec![n as u8; 1000],
    }
}

/// `fleetgate events repair` refuses while the log is owned (a running server), copies the intact
/// records out of a damaged segment, keeps the original as `.damaged` and says what it dropped.
#[test]
fn events_repair_is_offline_and_keeps_the_damaged_original() {
    use fleetgate_store::event_log::{EventLog, EventLogOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let events = dir.path().join("events");
    let log = EventLog::open(&events, EventLogOptions::default()).unwrap();
    log.append(&(0..50).map(test_event).collect::<Vec<_>>()).unwrap();
    let segment = events.join(format!("{:020}.events", 1));
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 8].fill(0xee);
    std::fs::write(&segment, &bytes).unwrap();

    let o = run(&["events", "repair", "--data-dir", d]);
    assert!(!o.status.success(), "refused while the log is in use");
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "nothing changed");
    drop(log);

    let out = stdout(&run(&["events", "repair", "--data-dir", d]));
    assert!(out.contains("1 repaired") && out.contains("dropped damaged bytes") && out.contains(".damaged"), "{out}");
    assert_eq!(std::fs::read(events.join(format!("{:020}.events.damaged", 1))).unwrap(), bytes);
    let log = EventLog::open(&events, EventLogOptions::default()).unwrap();
    assert_eq!(log.read("h", 0, 100).unwrap().events.len(), 49, "all but the damaged record");
    drop(log);
    assert!(stdout(&run(&["events", "repair", "--data-dir", d])).contains("no damage found"));
}

#[test]
fn serve_refuses_audit_and_auth_limits_out_of_range() {
    assert_serve_refuses(&[
        ("--audit-retention-days", "0"),
        ("--audit-retention-days", "forever"),
        ("--audit-max-rows", "10"),
        ("--auth-failure-window-secs", "0"),
        ("--auth-backoff-secs", "-1"),
        ("--auth-failure-limit", "lots"),
        ("--metrics-listen", "9100"),
    ]);
}

/// `fleetgate events verify` runs beside the log's owner (a running server), exits 0 on a clean
/// log, and on damage in a sealed segment exits non-zero naming the segment and bytes, changing
/// nothing.
#[test]
fn events_verify_reports_damage_beside_the_owner_and_changes_nothing() {
    use fleetgate_store::event_log::{EventLog, EventLogOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let events = dir.path().join("events");
    let log = EventLog::open(&events, EventLogOptions { segment_bytes: 20_000, ..EventLogOptions::default() }).unwrap();
    for batch in 0..3 {
        log.append(&(batch * 25..batch * 25 + 25).map(test_event).collect::<Vec<_>>()).unwrap();
    }
    let out = stdout(&run(&["events", "verify", "--data-dir", d]));
    assert!(out.contains("no damage found") && out.contains("75 whole record(s)"), "{out}");

    // Cut short the oldest segment (sealed: whole, and synced before the next was started).
    let segment = events.join(format!("{:020}.events", 1));
    let bytes = std::fs::read(&segment).unwrap();
    std::fs::write(&segment, &bytes[..bytes.len() - 100]).unwrap();
    let o = run(&["events", "verify", "--data-dir", d]);
    assert!(!o.status.success(), "damage exits non-zero");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(segment.to_str().unwrap()) && out.contains("damaged") && out.contains("events repair"),
        "{out}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("damaged"));
    assert_eq!(std::fs::read(&segment).unwrap(), &bytes[..bytes.len() - 100], "nothing changed");
    assert_eq!(log.read("h", 0, 100).unwrap().events.len(), 74, "the log is still open and readable");
}

/// Runs the binary with its stdout a pipe whose reader is already gone (as `| head` leaves it
/// once it has read enough).
fn run_into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(common::BIN)
        .args(args)
        .env_remove("FLEETGATE_CONNECTION_STRING")
        .env_remove("FLEETGATE_DATA_DIR")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn output_into_a_closed_pipe_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, (0..5000).map(|i| format!("dev-{i}\n")).collect::<String>()).unwrap();
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let s = serve();
    let d = s.dir();
    let runs: [&[&str]; 5] = [
        &["compute-device-key", "--key", key, "--registration-id", "dev-1"],
        &["compute-device-key", "--key", key, "--registration-ids-file", ids.to_str().unwrap()],
        &["info", "--data-dir", d],
        &["enrollment-group", "list", "--data-dir", d],
        &["audit", "--data-dir", d],
    ];
    for args in runs {
        let o = run_into_closed_pipe(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {:?} {err}", o.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn audit_since_takes_times_and_ages_and_limit_keeps_the_newest() {
    let s = serve();
    let d = s.dir();
    for g in ["grp-a", "grp-b", "grp-c"] {
        stdout(&run(&["enrollment-group", "create", "--data-dir", d, "--group-id", g]));
    }
    let lines = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["audit", "--data-dir", d];
        all.extend_from_slice(args);
        stdout(&run(&all)).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    // The trail is written behind the requests: wait until the last group's entry is in.
    common::wait_until("the last group's audit entry", || lines(&[]).iter().any(|e| e["target"] == "grp-c"));
    let all = lines(&[]);
    assert!(all.len() >= 3, "{all:?}");
    // The newest, printed oldest first.
    assert_eq!(lines(&["--limit", "1"]), all[all.len() - 1..]);
    assert_eq!(lines(&["--limit", "2"]), all[all.len() - 2..]);
    for recent in ["1h", "30m", "2d", "2000-01-01", "2000-01-01T01:00:00+01:00"] {
        assert_eq!(lines(&["--since", recent]), all, "{recent}");
    }
    assert!(lines(&["--since", "2999-01-01T00:00:00Z"]).is_empty());
    for bad in ["yesterday", "1y", "2026-13-01"] {
        let o = run(&["audit", "--data-dir", d, "--since", bad]);
        assert!(!o.status.success(), "{bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("--since"), "names the flag: {bad}");
    }
}
