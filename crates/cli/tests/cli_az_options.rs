//! What `az` users reach for: `-o/--output` formats, `--query`, `@file` values, shell
//! completions and bulk deletes, against a served instance.

mod common;

use std::process::Output;

use common::{json, run, serve, stdout};
use serde_json::Value;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn device_ids(d: &str) -> Vec<String> {
    let list = json(&run(&["hub", "device-identity", "list", "--data-dir", d, "--query", "[].deviceId"]));
    let mut ids: Vec<String> = serde_json::from_value(list).unwrap();
    ids.sort();
    ids
}

#[test]
fn completion_scripts_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&run(&["completion", shell]));
        for word in ["enrollment-group", "device-identity", "registration", "completion", "query"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    assert!(!run(&["completion", "tcsh"]).status.success());
}

#[test]
fn formats_query_at_files_and_bulk_deletes() {
    let s = serve();
    let d = s.dir();
    let files = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = files.path().join(name);
        std::fs::write(&p, text).unwrap();
        format!("@{}", p.display())
    };

    // @file for a JSON option; the twin arrives on the devices.
    let twin = file("twin.json", r#"{"tags":{"site":"lab"},"properties":{"desired":{"interval":30}}}"#);
    stdout(&run(&["enrollment-group", "create", "--data-dir", d, "--gid", "g", "--initial-twin", &twin]));
    let port = s.mqtt_port.to_string();
    let sim = stdout(&run(&[
        "simulate",
        "--data-dir",
        d,
        "--group-id",
        "g",
        "--devices",
        "3",
        "--messages",
        "1",
        "--mqtt-port",
        &port,
    ]));
    assert!(sim.contains("Sent 3 of 3 messages"), "{sim}");
    let t = json(&run(&["hub", "device-twin", "show", "--data-dir", d, "-d", "sim-g-00000"]));
    assert_eq!(t["tags"]["site"], "lab");
    let desired = file("desired.json", r#"{"interval":60}"#);
    let t = json(&run(&["hub", "device-twin", "update", "--data-dir", d, "-d", "sim-g-00000", "--desired", &desired]));
    assert_eq!(t["properties"]["desired"]["interval"], 60);
    let missing = files.path().join("missing.json");
    let o = run(&[
        "hub",
        "device-twin",
        "update",
        "--data-dir",
        d,
        "-d",
        "sim-g-00000",
        "--desired",
        &format!("@{}", missing.display()),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.json") && stderr(&o).contains("No such file"), "{}", stderr(&o));

    // Table: az's sorted columns of scalar fields, header and dashes, a row per record.
    let table = stdout(&run(&["registration", "list", "--data-dir", d, "--gid", "g", "-o", "table"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert!(header.contains(&"RegistrationId") && header.contains(&"Status"), "{table}");
    let mut sorted = header.clone();
    sorted.sort();
    assert_eq!(header, sorted, "columns in key order");
    assert!(!header.contains(&"Etag"), "etag is left out, as az does");
    assert!(lines[1].split("  ").all(|dashes| dashes.chars().all(|c| c == '-')), "{table}");
    for n in 0..3 {
        let id = format!("sim-g-0000{n}");
        assert!(lines[2..].iter().any(|row| row.contains(&id) && row.contains("assigned")), "{table}");
    }

    // TSV: values only, the keys' order, a line per object; with a query choosing them.
    let tsv = stdout(&run(&[
        "hub",
        "device-identity",
        "list",
        "--data-dir",
        d,
        "--query",
        "[].{s: status, d: deviceId}",
        "-o",
        "tsv",
    ]));
    let mut rows: Vec<&str> = tsv.lines().collect();
    rows.sort();
    assert_eq!(rows, ["sim-g-00000\tenabled", "sim-g-00001\tenabled", "sim-g-00002\tenabled"]);

    // --query filters before printing; jsonc off a terminal is the same JSON.
    let q = "[?deviceId=='sim-g-00001'].deviceId";
    let found = json(&run(&["hub", "device-identity", "list", "--data-dir", d, "--query", q]));
    assert_eq!(found, serde_json::json!(["sim-g-00001"]));
    let colored = json(&run(&["hub", "device-identity", "list", "--data-dir", d, "--query", q, "-o", "jsonc"]));
    assert_eq!(colored, found);
    let o = run(&["hub", "device-identity", "list", "--data-dir", d, "--query", "[?deviceId=="]);
    assert!(!o.status.success() && o.stdout.is_empty());
    assert!(stderr(&o).contains("--query is not a valid JMESPath expression"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));

    // Bulk delete of a group's registrations: only with --yes, then every record goes.
    let o = run(&["registration", "delete", "--data-dir", d, "--group-id", "g", "--all"]);
    assert!(!o.status.success() && stderr(&o).contains("--yes"), "{}", stderr(&o));
    let count =
        |d: &str| json(&run(&["registration", "list", "--data-dir", d, "--gid", "g"])).as_array().unwrap().len();
    assert_eq!(count(d), 3, "nothing deleted without --yes");
    let report = json(&run(&["registration", "delete", "--data-dir", d, "--group-id", "g", "--all", "--yes"]));
    assert_eq!(report.as_array().unwrap().len(), 3);
    assert!(report.as_array().unwrap().iter().all(|r| r["deleted"] == true), "{report}");
    assert_eq!(count(d), 0);

    // Several devices at once: a missing one is reported, the others still go, the exit fails.
    let o = run(&["hub", "device-identity", "delete", "--data-dir", d, "-d", "sim-g-00000", "nobody", "sim-g-00001"]);
    assert!(!o.status.success());
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let deleted: Vec<(&str, bool)> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["deviceId"].as_str().unwrap(), r["deleted"].as_bool().unwrap()))
        .collect();
    assert_eq!(deleted, [("sim-g-00000", true), ("nobody", false), ("sim-g-00001", true)]);
    assert!(stderr(&o).contains("1 of 3 deletions failed"), "{}", stderr(&o));
    assert_eq!(device_ids(d), ["sim-g-00002"]);
    let o = run(&["hub", "device-identity", "delete", "--data-dir", d, "--all"]);
    assert!(!o.status.success());
    assert_eq!(device_ids(d), ["sim-g-00002"]);
    stdout(&run(&["hub", "device-identity", "delete", "--data-dir", d, "--all", "-y"]));
    assert!(device_ids(d).is_empty());
}
