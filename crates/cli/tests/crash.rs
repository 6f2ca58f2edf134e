//! Crash safety (issue 7): `kill -9` the server in the middle of a provisioning storm and of a
//! telemetry flood, restart it on the same data directory, and check what devices were told:
//! every device told `assigned` has its registration record and exactly one hub identity (with
//! its derived keys), no device is on two hubs, every message that got a PUBACK is in the stream
//! exactly once, and both SQLite files pass `PRAGMA integrity_check`. Each scenario is killed at
//! three points, chosen by counting acknowledgements (about 30 %, 60 % and 90 % of the round's
//! work), and the restarted server must go on serving (interrupted devices re-register, devices
//! reconnect and send). Run with `--nocapture` to see the counts.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{json, run, Server};
use fleetgate_client::device::{register, HubClient, HubOptions, RegisterOptions};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::message::Properties;
use fleetgate_store::EventLog;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Fractions of a round's expected acknowledgements after which the server is killed.
const KILL_POINTS: [f64; 3] = [0.3, 0.6, 0.9];
/// A second linked hub, so that "never on two hubs" means something.
const SECOND_HUB: &str = "crash-hub-2.fleetgate.local";
/// Registrations per storm round, and how many run at once.
const STORM_DEVICES: usize = 300;
const STORM_CONCURRENCY: usize = 50;
/// Devices in the telemetry flood, the messages each sends per round at most, and how many of
/// them each device keeps waiting for their PUBACK at once (so the kill finds full commit batches).
const FLOOD_DEVICES: usize = 50;
const FLOOD_MESSAGES_PER_DEVICE: usize = 100;
const FLOOD_WINDOW: usize = 4;
/// Limit for one registration, connection or PUBACK; a dead server fails them at once.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a round may wait for its kill point.
const ROUND_TIMEOUT: Duration = Duration::from_secs(40);

/// What every device of one data directory shares.
struct Fleet {
    dir: PathBuf,
    host: String,
    ca_pem: Vec<u8>,
    id_scope: String,
    group_primary: SymmetricKey,
    group_secondary: SymmetricKey,
}

impl Fleet {
    /// Starts a server on a new data directory (inside `root`), links a second hub and creates a
    /// symmetric-key enrollment group.
    fn create(root: &Path, group_id: &str) -> (Fleet, Server) {
        let dir = root.join("data");
        let server = Server::start(&dir);
        let d = dir.to_str().unwrap();
        json(&run(&["hub", "create", "--data-dir", d, "--hostname", SECOND_HUB]));
        let group = json(&run(&["enrollment-group", "create", "--data-dir", d, "--group-id", group_id]));
        let key = |k: &str| {
            let b64 = group["attestation"]["symmetricKey"][k].as_str().unwrap_or_else(|| panic!("no {k}: {group}"));
            SymmetricKey::from_base64(b64).unwrap()
        };
        let instance = fleetgate_server::Instance::read(&dir).unwrap();
        assert_eq!(instance.hubs.len(), 2, "two linked hubs");
        let fleet = Fleet {
            host: instance.global_device_endpoint.clone(),
            ca_pem: std::fs::read(&instance.ca_certificate).unwrap(),
            id_scope: instance.id_scope.clone(),
            group_primary: key("primaryKey"),
            group_secondary: key("secondaryKey"),
            dir,
        };
        (fleet, server)
    }

    fn register_options(&self, port: u16, registration_id: &str) -> RegisterOptions {
        let key = self.group_primary.derive_device_key(registration_id);
        let mut o = RegisterOptions::new(&self.host, self.ca_pem.clone(), &self.id_scope, registration_id, key);
        o.port = port;
        o.timeout = DEVICE_TIMEOUT;
        o
    }

    fn hub_options(&self, port: u16, d: &Assigned) -> HubOptions {
        let key = self.group_primary.derive_device_key(&d.registration_id);
        let mut o = HubOptions::new(&self.host, self.ca_pem.clone(), &d.hub, &d.device_id, key);
        o.port = port;
        o.timeout = DEVICE_TIMEOUT;
        o
    }
}

/// A registration the device saw answered `assigned`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Assigned {
    registration_id: String,
    hub: String,
    device_id: String,
}

/// What one storm saw: the devices told `assigned`, and the ones whose registration failed.
struct StormOutcome {
    assigned: Vec<Assigned>,
    interrupted: Vec<String>,
}

/// Registers `ids` (`STORM_CONCURRENCY` at a time). With `kill_at`, SIGKILLs the server as soon
/// as that many devices have been told `assigned`, then lets every registration end.
async fn storm(fleet: &Arc<Fleet>, server: &mut Server, ids: Vec<String>, kill_at: Option<usize>) -> StormOutcome {
    let total = ids.len();
    let assigned = Arc::new(Mutex::new(Vec::new()));
    let interrupted = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(Semaphore::new(STORM_CONCURRENCY));
    let port = server.mqtt_port;
    let mut tasks = JoinSet::new();
    for id in ids {
        let (fleet, limit) = (fleet.clone(), limit.clone());
        let (assigned, interrupted, acked, finished) =
            (assigned.clone(), interrupted.clone(), acked.clone(), finished.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            match register(&fleet.register_options(port, &id)).await {
                Ok(r) => {
                    assert_eq!(r.status, "assigned");
                    assert_eq!(r.registration_id, id);
                    assigned.lock().unwrap().push(Assigned {
                        registration_id: id,
                        hub: r.assigned_hub,
                        device_id: r.device_id,
                    });
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => interrupted.lock().unwrap().push((id, e.to_string())),
            }
            finished.fetch_add(1, Ordering::SeqCst);
        });
    }
    if let Some(kill_at) = kill_at {
        wait_then_kill(server, &acked, kill_at, || finished.load(Ordering::SeqCst) == total, "provisioning storm")
            .await;
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a registration task panicked");
    }
    let assigned = std::mem::take(&mut *assigned.lock().unwrap());
    let interrupted = std::mem::take(&mut *interrupted.lock().unwrap());
    if kill_at.is_none() {
        assert!(interrupted.is_empty(), "registrations failed with the server up: {interrupted:?}");
    }
    StormOutcome { assigned, interrupted: interrupted.into_iter().map(|(id, _)| id).collect() }
}

/// Waits until `acked` reaches `kill_at` (failing if the work ends first or takes too long), then
/// SIGKILLs the server.
async fn wait_then_kill(
    server: &mut Server,
    acked: &AtomicUsize,
    kill_at: usize,
    all_done: impl Fn() -> bool,
    what: &str,
) {
    let started = Instant::now();
    while acked.load(Ordering::SeqCst) < kill_at {
        assert!(
            !all_done(),
            "{what} ended with {} acknowledged, before the kill point {kill_at}",
            acked.load(Ordering::SeqCst)
        );
        assert!(
            started.elapsed() < ROUND_TIMEOUT,
            "{what}: only {} of {kill_at} acknowledged after {ROUND_TIMEOUT:?}",
            acked.load(Ordering::SeqCst)
        );
        // Backoff between polls (short: the kill should land close to its point).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill9();
}

/// A read-only connection beside the running server (WAL: readers never block it).
fn open_read_only(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// `PRAGMA integrity_check` on both store files must answer exactly `ok`.
fn check_integrity(dir: &Path) {
    for file in ["fleetgate.db", "telemetry.db"] {
        let c = open_read_only(&dir.join(file));
        let rows: Vec<String> = c
            .prepare("PRAGMA integrity_check")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, ["ok"], "integrity_check of {file} after kill -9");
    }
}

/// Checks the registry against what devices were told; returns the number of devices checked.
///
/// For every device in `told`: its registration record is `assigned` to the hub and device id
/// it was told, and that hub holds its identity with both derived keys. Across the whole store:
/// no device id is on two hubs, every identity has an assigned record naming its hub, and every
/// assigned record has its identity.
fn check_registry(fleet: &Fleet, told: &BTreeMap<String, Assigned>) -> usize {
    let c = open_read_only(&fleet.dir.join("fleetgate.db"));
    let mut records: HashMap<String, Value> = HashMap::new();
    let mut st = c.prepare("SELECT reg_key, body FROM registrations").unwrap();
    for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).unwrap() {
        let (k, body) = row.unwrap();
        records.insert(k, serde_json::from_str(&body).unwrap());
    }
    // (hub key, device key) -> identity body
    let mut identities: HashMap<(String, String), Value> = HashMap::new();
    let mut hubs_of: HashMap<String, Vec<String>> = HashMap::new();
    let mut st = c.prepare("SELECT hub_key, device_key, body FROM devices").unwrap();
    for row in
        st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))).unwrap()
    {
        let (h, d, body) = row.unwrap();
        hubs_of.entry(d.clone()).or_default().push(h.clone());
        identities.insert((h, d), serde_json::from_str(&body).unwrap());
    }

    for a in told.values() {
        let rec = records.get(&a.registration_id.to_ascii_lowercase()).unwrap_or_else(|| {
            panic!(
                "LOST: {} was told `assigned` ({} on {}) but has no registration record",
                a.registration_id, a.device_id, a.hub
            )
        });
        assert_eq!(rec["status"], "assigned", "{}: record after restart: {rec}", a.registration_id);
        assert_eq!(rec["assignedHub"], a.hub.as_str(), "{}: record names another hub: {rec}", a.registration_id);
        assert_eq!(rec["deviceId"], a.device_id.as_str(), "{}: record names another device: {rec}", a.registration_id);
        let id = identities.get(&(a.hub.to_ascii_lowercase(), a.device_id.to_ascii_lowercase())).unwrap_or_else(|| {
            panic!("LOST: {} was told `assigned` but hub {} has no identity {}", a.registration_id, a.hub, a.device_id)
        });
        assert_eq!(
            id["primaryKey"],
            fleet.group_primary.derive_device_key(&a.registration_id).to_base64().as_str(),
            "{}: primary key",
            a.registration_id
        );
        assert_eq!(
            id["secondaryKey"],
            fleet.group_secondary.derive_device_key(&a.registration_id).to_base64().as_str(),
            "{}: secondary key",
            a.registration_id
        );
    }

    for (device, hubs) in &hubs_of {
        assert_eq!(hubs.len(), 1, "device {device} has identities on several hubs: {hubs:?}");
    }
    let by_device: HashMap<String, &Value> =
        records.values().filter_map(|r| Some((r["deviceId"].as_str()?.to_ascii_lowercase(), r))).collect();
    for (hub, device) in identities.keys() {
        let rec =
            by_device.get(device).unwrap_or_else(|| panic!("identity {device} on {hub} has no registration record"));
        assert_eq!(rec["status"], "assigned", "identity {device} on {hub}: {rec}");
        assert!(rec["assignedHub"].as_str().is_some_and(|h| h.eq_ignore_ascii_case(hub)), "{device}: {rec}");
    }
    for rec in records.values().filter(|r| r["status"] == "assigned") {
        let key = (
            rec["assignedHub"].as_str().unwrap().to_ascii_lowercase(),
            rec["deviceId"].as_str().unwrap().to_ascii_lowercase(),
        );
        assert!(identities.contains_key(&key), "assigned record without its hub identity: {rec}");
    }
    told.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_storm_survives_kill_9() {
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut server) = Fleet::create(root.path(), "crash-storm");
    let fleet = Arc::new(fleet);
    let mut told: BTreeMap<String, Assigned> = BTreeMap::new();

    for (round, fraction) in KILL_POINTS.iter().enumerate() {
        let ids: Vec<String> = (0..STORM_DEVICES).map(|i| format!("storm-r{round}-{i:04}")).collect();
        let kill_at = (STORM_DEVICES as f64 * fraction).round() as usize;
        let out = storm(&fleet, &mut server, ids, Some(kill_at)).await;
        assert!(out.assigned.len() >= kill_at, "killed after {kill_at} assignments, saw {}", out.assigned.len());
        let assigned_before_kill = out.assigned.len();
        for a in out.assigned {
            told.insert(a.registration_id.clone(), a);
        }

        // Restart on the same directory; check what the crash left, before anything else writes.
        server = Server::start(&fleet.dir);
        check_integrity(&fleet.dir);
        let checked = check_registry(&fleet, &told);

        // Interrupted devices register again (some were committed but never told), plus a new one.
        let mut again = out.interrupted.clone();
        again.push(format!("storm-r{round}-after-restart"));
        let retried = storm(&fleet, &mut server, again.clone(), None).await;
        assert_eq!(retried.assigned.len(), again.len());
        for a in retried.assigned {
            told.insert(a.registration_id.clone(), a);
        }
        check_registry(&fleet, &told);
        check_integrity(&fleet.dir);
        println!(
            "crash storm round {}: kill at {kill_at}/{STORM_DEVICES} assigned; {assigned_before_kill} told assigned \
             before the kill, {} interrupted (all re-registered); kills survived {}, devices checked {checked} \
             (then {} with the re-registrations)",
            round + 1,
            out.interrupted.len(),
            round + 1,
            told.len()
        );
    }
    assert!(told.len() >= KILL_POINTS.len() * STORM_DEVICES);
    println!(
        "crash storm: kills survived {}, devices checked {}, in {:.1} s",
        KILL_POINTS.len(),
        told.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A message body unique across the whole test.
fn flood_body(round: usize, device: &str, seq: usize) -> String {
    format!("{{\"round\":{round},\"device\":\"{device}\",\"seq\":{seq}}}")
}

/// Which device (and hub) each acknowledged body came from.
type AckedMessages = HashMap<String, Assigned>;

/// Connects every device and has each send up to `FLOOD_MESSAGES_PER_DEVICE` messages,
/// `FLOOD_WINDOW` awaiting their PUBACK at a time; with `kill_at`, SIGKILLs the server once that many have been acknowledged.
/// Returns the acknowledged bodies and how many sends failed (not acknowledged).
async fn flood(
    fleet: &Arc<Fleet>,
    server: &mut Server,
    devices: &[Assigned],
    round: usize,
    kill_at: Option<usize>,
) -> (AckedMessages, usize) {
    let port = server.mqtt_port;
    let mut clients = Vec::new();
    let mut connects = JoinSet::new();
    for d in devices {
        let (o, d) = (fleet.hub_options(port, d), d.clone());
        connects.spawn(async move { (d, HubClient::connect(&o).await) });
    }
    while let Some(joined) = connects.join_next().await {
        let (d, c) = joined.unwrap();
        let c = c.unwrap_or_else(|e| panic!("{} could not connect to {} after the restart: {e}", d.device_id, d.hub));
        clients.push((d, c));
    }

    let acked = Arc::new(Mutex::new(HashMap::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for (d, client) in clients {
        let client = Arc::new(client);
        // Lane `w` sends the device's messages w, w + FLOOD_WINDOW, ...; it stops at its first
        // failure (the kill), so every lane ends when the server dies.
        for lane in 0..FLOOD_WINDOW {
            let (acked, count, failed, finished) = (acked.clone(), count.clone(), failed.clone(), finished.clone());
            let (d, client) = (d.clone(), client.clone());
            tasks.spawn(async move {
                for seq in (lane..FLOOD_MESSAGES_PER_DEVICE).step_by(FLOOD_WINDOW) {
                    let body = flood_body(round, &d.device_id, seq);
                    let mut props = Properties::default();
                    props.system.insert("message-id".into(), format!("{}-{round}-{seq}", d.device_id));
                    match client.send_telemetry(body.clone().into_bytes(), &props).await {
                        Ok(()) => {
                            acked.lock().unwrap().insert(body, d.clone());
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                }
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
    }
    if let Some(kill_at) = kill_at {
        let n = devices.len() * FLOOD_WINDOW;
        wait_then_kill(server, &count, kill_at, || finished.load(Ordering::SeqCst) == n, "telemetry flood").await;
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a telemetry task panicked");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let failed = failed.load(Ordering::SeqCst);
    if kill_at.is_none() {
        assert_eq!(failed, 0, "sends failed with the server up");
    }
    (acked, failed)
}

/// Every acknowledged body is in the stream exactly once, from its device on its hub; no body
/// (acknowledged or not) is there twice. The event log is read from disk beside the restarted
/// server. Returns (messages checked, events in the stream).
fn check_stream(fleet: &Fleet, acked: &AckedMessages) -> (usize, usize) {
    let log = EventLog::open_read_only(&fleet.dir.join("events")).unwrap();
    let mut hubs: Vec<String> = acked.values().map(|a| a.hub.to_ascii_lowercase()).collect();
    hubs.push(SECOND_HUB.into());
    hubs.sort();
    hubs.dedup();
    // body -> (hub, device, position) of each copy
    let mut seen: HashMap<String, Vec<(String, String, u64)>> = HashMap::new();
    let mut events = 0;
    for hub in &hubs {
        let mut from = 0;
        loop {
            let page = log.read(hub, from, usize::MAX).unwrap();
            for (seq, e) in page.events {
                seen.entry(String::from_utf8(e.body).unwrap()).or_default().push((hub.clone(), e.device_id, seq));
                events += 1;
            }
            if page.next == from {
                break;
            }
            from = page.next;
        }
    }
    for (body, copies) in &seen {
        let seqs: Vec<u64> = copies.iter().map(|c| c.2).collect();
        assert_eq!(copies.len(), 1, "message {body} is in the stream {} times (positions {seqs:?})", copies.len());
    }
    let mut missing: Vec<&String> = acked.keys().filter(|b| !seen.contains_key(*b)).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "LOST: {} acknowledged (PUBACKed) message(s) missing from the stream after kill -9, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for (body, d) in acked {
        let (hub, device, _) = &seen[body][0];
        assert_eq!(device, &d.device_id, "{body}: stored under another device");
        assert!(hub.eq_ignore_ascii_case(&d.hub), "{body}: stored on hub {hub} instead of {}", d.hub);
    }
    (acked.len(), events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_flood_survives_kill_9() {
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let (fleet, mut server) = Fleet::create(root.path(), "crash-flood");
    let fleet = Arc::new(fleet);
    let ids: Vec<String> = (0..FLOOD_DEVICES).map(|i| format!("flood-{i:03}")).collect();
    let devices = storm(&fleet, &mut server, ids, None).await.assigned;
    assert_eq!(devices.len(), FLOOD_DEVICES);
    assert!(devices.iter().any(|d| d.hub == SECOND_HUB), "the devices are spread over both hubs");

    let per_round = FLOOD_DEVICES * FLOOD_MESSAGES_PER_DEVICE;
    let mut acked = AckedMessages::new();
    for (round, fraction) in KILL_POINTS.iter().enumerate() {
        let kill_at = (per_round as f64 * fraction).round() as usize;
        let (got, failed) = flood(&fleet, &mut server, &devices, round, Some(kill_at)).await;
        assert!(got.len() >= kill_at, "killed after {kill_at} PUBACKs, saw {}", got.len());
        let acked_this_round = got.len();
        acked.extend(got);

        server = Server::start(&fleet.dir);
        check_integrity(&fleet.dir);
        let (checked, events) = check_stream(&fleet, &acked);
        println!(
            "crash flood round {}: kill at {kill_at}/{per_round} PUBACKs; {acked_this_round} acknowledged, \
             {failed} sends cut off by the kill; kills survived {}, messages checked {checked} \
             ({events} events in the stream)",
            round + 1,
            round + 1,
        );
    }

    // The restarted server takes telemetry again, and keeps it.
    let (got, _) = flood(&fleet, &mut server, &devices[..5], KILL_POINTS.len(), None).await;
    assert_eq!(got.len(), 5 * FLOOD_MESSAGES_PER_DEVICE);
    acked.extend(got);
    let (checked, _) = check_stream(&fleet, &acked);
    check_integrity(&fleet.dir);
    println!(
        "crash flood: kills survived {}, messages checked {checked}, in {:.1} s",
        KILL_POINTS.len(),
        started.elapsed().as_secs_f64()
    );
}
