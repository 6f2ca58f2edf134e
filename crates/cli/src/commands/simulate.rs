//! `fleetgate simulate`: the tutorial's "provision more devices". Derives a key for each
//! simulated device of an enrollment group, registers them all over MQTT with the project's own
//! device client, then (with `--messages`) connects each to its assigned hub (dialled by the name
//! DPS answered, as a device does) and sends telemetry.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetgate_client::device::{register, DeviceError, HubClient, HubOptions, RegisterOptions, RegistrationResult};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::message::Properties;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{client, describe};
use crate::Target;

/// Largest telemetry body the hub accepts.
const MAX_BODY_BYTES: usize = 256 * 1024;

#[derive(clap::Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    target: Target,
    /// Enrollment group the simulated devices belong to.
    #[arg(long)]
    group_id: String,
    /// Number of devices; their registration ids are `sim-{group}-{index:05}`.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Index of the first device (to add devices to an earlier run).
    #[arg(long, default_value_t = 0)]
    start_index: usize,
    /// Telemetry messages each device sends after provisioning (0: provision only).
    #[arg(long, default_value_t = 0)]
    messages: usize,
    /// Devices working at the same time.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// The group's symmetric key (default: read through the service API).
    #[arg(long, env = "FLEETGATE_GROUP_KEY", hide_env_values = true)]
    group_key: Option<String>,
    /// ID scope (default: the data directory's instance.json).
    #[arg(long)]
    id_scope: Option<String>,
    /// Address the devices register at; also the name the server certificate must carry
    /// (default: the instance's global device endpoint). Devices then connect to the hub DPS
    /// assigned them by its name, as real devices do.
    #[arg(long)]
    host: Option<String>,
    /// MQTT over TLS port.
    #[arg(long, env = "FLEETGATE_MQTT_PORT", default_value_t = 8883)]
    mqtt_port: u16,
    /// Size of each telemetry body in bytes (a JSON object padded to this size).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Seconds allowed for one registration, one hub connection, or one message's PUBACK.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// What every device shares.
struct Setup {
    host: String,
    port: u16,
    ca_pem: Vec<u8>,
    id_scope: String,
    group_key: SymmetricKey,
    timeout: Duration,
}

struct Provisioned {
    registration_id: String,
    key: SymmetricKey,
    result: RegistrationResult,
}

/// Failure counts by reason, per phase.
#[derive(Default)]
struct Failures(BTreeMap<String, usize>);

impl Failures {
    fn add(&mut self, phase: &str, e: &DeviceError) {
        *self.0.entry(format!("{phase}: {}", e.reason())).or_default() += 1;
    }
    fn total(&self) -> usize {
        self.0.values().sum()
    }
}

pub fn registration_id(group_id: &str, index: usize) -> String {
    format!("sim-{group_id}-{index:05}")
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.payload_bytes > MAX_BODY_BYTES {
        bail!("--payload-bytes must be at most {MAX_BODY_BYTES} (the hub's message size limit)");
    }
    let ids: Vec<String> =
        (args.start_index..args.start_index + args.devices).map(|i| registration_id(&args.group_id, i)).collect();
    for id in [ids.first(), ids.last()].into_iter().flatten() {
        fleetgate_core::ids::RegistrationId::parse(id)
            .map_err(|e| anyhow!("'{id}' is not a valid registration id ({}); use a shorter group id", e.message))?;
    }
    let setup = Arc::new(setup(&args).await?);

    let mut failures = Failures::default();
    let started = Instant::now();
    let provisioned = provision_all(&setup, ids, args.concurrency, &mut failures).await;
    let provision_secs = started.elapsed().as_secs_f64();
    outln!(
        "Provisioned {} of {} devices in {provision_secs:.2} s ({:.1} devices/s)",
        provisioned.len(),
        args.devices,
        rate(provisioned.len(), provision_secs)
    );

    if args.messages > 0 && !provisioned.is_empty() {
        let started = Instant::now();
        let expected = provisioned.len() * args.messages;
        let sent = telemetry_all(&setup, provisioned, &args, &mut failures).await;
        let secs = started.elapsed().as_secs_f64();
        outln!("Sent {sent} of {expected} messages in {secs:.2} s ({:.1} messages/s)", rate(sent, secs));
    } else {
        outln!("Sent 0 messages");
    }

    if failures.total() == 0 {
        outln!("Failures: none");
        return Ok(());
    }
    outln!("Failures:");
    for (reason, n) in &failures.0 {
        outln!("  {reason}: {n}");
    }
    Err(anyhow!("{} operation(s) failed", failures.total()))
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Resolves the scope, CA, host and group key from the flags and the local instance.
async fn setup(args: &SimulateArgs) -> anyhow::Result<Setup> {
    let t = &args.target;
    // A local instance tells the scope, endpoint and CA; with a connection string it is some
    // other server, so nothing is taken from a local data directory.
    let instance = match &t.connection_string {
        None => Some(
            fleetgate_server::Instance::read(&t.data_dir)
                .with_context(|| format!("no --connection-string given and no instance in {}", t.data_dir.display()))?,
        ),
        Some(_) => None,
    };
    let id_scope = match (&args.id_scope, &instance) {
        (Some(s), _) => s.clone(),
        (None, Some(i)) => i.id_scope.clone(),
        (None, None) => bail!("--id-scope is required with --connection-string"),
    };
    let ca_path = t
        .ca_cert
        .clone()
        .or_else(|| instance.as_ref().map(|i| i.ca_certificate.clone().into()))
        .ok_or_else(|| anyhow!("--ca-cert is required with --connection-string"))?;
    let ca_pem = std::fs::read(&ca_path).with_context(|| format!("reading CA certificate {}", ca_path.display()))?;
    let host = match (&args.host, &instance, &t.connection_string) {
        (Some(h), _, _) => h.clone(),
        (None, Some(i), _) => i.global_device_endpoint.clone(),
        (None, None, Some(cs)) => connection_string_host(cs)?,
        (None, None, None) => unreachable!("an instance is read when there is no connection string"),
    };
    let group_key = match &args.group_key {
        Some(k) => k.clone(),
        None => {
            let att = client(t)?.enrollment_group_attestation(&args.group_id).await.map_err(describe)?;
            att.pointer("/symmetricKey/primaryKey").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| {
                anyhow!("enrollment group '{}' has no symmetric key (attestation type {})", args.group_id, att["type"])
            })?
        }
    };
    let group_key = SymmetricKey::from_base64(&group_key).map_err(|e| anyhow!("invalid group key: {}", e.message))?;
    Ok(Setup { host, port: args.mqtt_port, ca_pem, id_scope, group_key, timeout: Duration::from_secs(args.timeout) })
}

/// The host part of a connection string's `HostName` (without a port).
fn connection_string_host(cs: &str) -> anyhow::Result<String> {
    let conn: fleetgate_client::ConnectionString =
        cs.parse().map_err(|e: String| anyhow!("invalid connection string: {e}"))?;
    let h = conn.host_name;
    Ok(match h.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) && !host.ends_with(':') => {
            host.trim_start_matches('[').trim_end_matches(']').to_owned()
        }
        _ => h,
    })
}

fn progress(len: usize, what: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} {per_sec:>12} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what);
    pb
}

async fn provision_all(
    setup: &Arc<Setup>,
    ids: Vec<String>,
    concurrency: usize,
    failures: &mut Failures,
) -> Vec<Provisioned> {
    let bar = progress(ids.len(), "provisioning");
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for id in ids {
        let permit = limit.clone().acquire_owned().await.expect("semaphore is never closed");
        let setup = setup.clone();
        let bar = bar.clone();
        tasks.spawn(async move {
            let key = setup.group_key.derive_device_key(&id);
            let mut o = RegisterOptions::new(&setup.host, setup.ca_pem.clone(), &setup.id_scope, &id, key.clone());
            o.port = setup.port;
            o.timeout = setup.timeout;
            let r = register(&o).await;
            drop(permit);
            bar.inc(1);
            r.map(|result| Provisioned { registration_id: id, key, result })
        });
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("a provisioning task panicked") {
            Ok(p) => done.push(p),
            Err(e) => failures.add("provisioning", &e),
        }
    }
    bar.finish_and_clear();
    done.sort_by(|a, b| a.registration_id.cmp(&b.registration_id));
    done
}

/// A JSON body of exactly `size` bytes when `size` allows (else the smallest such body).
fn telemetry_body(device_id: &str, seq: usize, size: usize) -> Vec<u8> {
    let base = format!("{{\"deviceId\":{},\"seq\":{seq},\"pad\":\"\"}}", Value::from(device_id));
    let pad = size.saturating_sub(base.len());
    format!("{{\"deviceId\":{},\"seq\":{seq},\"pad\":\"{}\"}}", Value::from(device_id), "x".repeat(pad)).into_bytes()
}

/// Connects every device to its hub and sends `--messages` each; returns the messages acknowledged.
async fn telemetry_all(
    setup: &Arc<Setup>,
    devices: Vec<Provisioned>,
    args: &SimulateArgs,
    failures: &mut Failures,
) -> usize {
    let bar = progress(devices.len() * args.messages, "telemetry");
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = JoinSet::new();
    for d in devices {
        let permit = limit.clone().acquire_owned().await.expect("semaphore is never closed");
        let setup = setup.clone();
        let bar = bar.clone();
        let (messages, size) = (args.messages, args.payload_bytes);
        tasks.spawn(async move {
            // The assigned hub's name, as a device dials it: a hub the certificate or DNS does
            // not know fails here as it would for a real device.
            let mut o = HubOptions::new(
                &d.result.assigned_hub,
                setup.ca_pem.clone(),
                &d.result.assigned_hub,
                &d.result.device_id,
                d.key.clone(),
            );
            o.port = setup.port;
            o.timeout = setup.timeout;
            let outcome = send_messages(&o, &d.registration_id, messages, size, &bar).await;
            drop(permit);
            outcome
        });
    }
    let mut sent = 0;
    while let Some(joined) = tasks.join_next().await {
        let (n, err) = joined.expect("a telemetry task panicked");
        sent += n;
        if let Some(e) = err {
            failures.add("hub", &e);
        }
    }
    bar.finish_and_clear();
    sent
}

/// One device's session: connect, send, disconnect. Stops at the first failure.
async fn send_messages(
    o: &HubOptions,
    registration_id: &str,
    messages: usize,
    size: usize,
    bar: &ProgressBar,
) -> (usize, Option<DeviceError>) {
    let hub = match HubClient::connect(o).await {
        Ok(h) => h,
        Err(e) => return (0, Some(e)),
    };
    let mut sent = 0;
    for seq in 0..messages {
        let mut props = Properties::default();
        props.system.insert("message-id".into(), format!("{registration_id}-{seq}"));
        props.system.insert("content-type".into(), "application/json".into());
        props.system.insert("content-encoding".into(), "utf-8".into());
        if let Err(e) = hub.send_telemetry(telemetry_body(&o.device_id, seq, size), &props).await {
            return (sent, Some(e));
        }
        sent += 1;
        bar.inc(1);
    }
    let _ = hub.disconnect().await;
    (sent, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_bodies_and_hosts() {
        assert_eq!(registration_id("grp-1", 7), "sim-grp-1-00007");
        let b = telemetry_body("sim-grp-1-00007", 3, 100);
        assert_eq!(b.len(), 100);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["seq"], 3);
        let small = telemetry_body("d", 0, 1);
        assert!(serde_json::from_slice::<Value>(&small).is_ok());
        assert_eq!(
            connection_string_host("HostName=localhost:8443;SharedAccessKeyName=p;SharedAccessKey=AAAA").unwrap(),
            "localhost"
        );
        assert_eq!(
            connection_string_host("HostName=dps.example.com;SharedAccessKeyName=p;SharedAccessKey=AAAA").unwrap(),
            "dps.example.com"
        );
    }
}
