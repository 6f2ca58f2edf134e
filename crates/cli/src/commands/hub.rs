//! `fleetgate hub ...`, mirroring `az iot hub`: linked hubs, device identities, twins, direct
//! methods, cloud-to-device messages and monitor-events.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use fleetgate_client::hub_service::C2dOptions;
use fleetgate_client::{ConnectionString, RawHubClient};
use serde_json::{json, Value};

use super::{describe, print_result};
use crate::at_file;

/// Which hub: a connection string (`--login`, as az), else a hub of the local data directory.
#[derive(Args, Clone)]
pub struct HubTarget {
    /// Hub connection string (HostName=...;SharedAccessKeyName=iothubowner;SharedAccessKey=...).
    #[arg(long, short = 'l', env = "FLEETGATE_HUB_CONNECTION_STRING", hide_env_values = true)]
    login: Option<String>,
    /// Hub host name in the local instance (default: its first hub).
    #[arg(long, short = 'n')]
    hub_name: Option<String>,
    /// Data directory of the local instance (used when no --login is given).
    #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
    data_dir: PathBuf,
    /// PEM file of the CA to trust (default: the data dir's ca.pem).
    #[arg(long, env = "FLEETGATE_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

impl HubTarget {
    fn client(&self) -> anyhow::Result<RawHubClient> {
        let (conn, ca_default) = match &self.login {
            Some(c) => (c.clone(), None),
            None => {
                let inst = fleetgate_server::Instance::read(&self.data_dir)
                    .with_context(|| format!("no --login given and no instance in {}", self.data_dir.display()))?;
                let hub = match &self.hub_name {
                    Some(name) => inst
                        .hubs
                        .iter()
                        .find(|h| h.host_name.eq_ignore_ascii_case(name))
                        .ok_or_else(|| anyhow!("no hub named '{name}' in this instance"))?,
                    None => inst.hubs.first().ok_or_else(|| anyhow!("the instance has no hub"))?,
                };
                (hub.connection_string.clone(), Some(PathBuf::from(&inst.ca_certificate)))
            }
        };
        let conn: ConnectionString = conn.parse().map_err(|e: String| anyhow!("invalid hub connection string: {e}"))?;
        let ca = match self.ca_cert.clone().or(ca_default) {
            Some(p) => Some(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        Ok(RawHubClient::new(conn, ca.as_deref())?)
    }
}

#[derive(Subcommand)]
pub enum HubCommand {
    /// List the hubs linked to the local instance.
    List {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
    },
    /// Add a hub to the local instance (takes effect at once; restart `serve` with a matching
    /// `--hostname` if devices will dial this name).
    Create {
        #[command(flatten)]
        target: crate::Target,
        /// Host name of the hub to add.
        #[arg(long)]
        hostname: String,
    },
    /// Device identities (`az iot hub device-identity`).
    #[command(subcommand)]
    DeviceIdentity(DeviceIdentity),
    /// Device twins (`az iot hub device-twin`).
    #[command(subcommand)]
    DeviceTwin(DeviceTwin),
    /// Invoke a direct method on a connected device.
    InvokeDeviceMethod {
        #[command(flatten)]
        target: HubTarget,
        /// Id of the device.
        #[arg(long, short = 'd')]
        device_id: String,
        /// Name of the method to call.
        #[arg(long, visible_alias = "mn")]
        method_name: String,
        /// JSON payload, inline or `@file.json` (`@-`: standard input).
        #[arg(long, visible_alias = "mp", default_value = "{}", value_parser = at_file::json)]
        method_payload: Value,
        /// Seconds to wait for the device (5 to 300).
        #[arg(long, visible_alias = "to", default_value_t = 30)]
        timeout: u64,
    },
    /// Cloud-to-device messages (`az iot device c2d-message`).
    #[command(subcommand)]
    C2dMessage(C2dMessage),
    /// Print device-to-cloud messages as they arrive, one JSON object per message.
    MonitorEvents {
        #[command(flatten)]
        target: HubTarget,
        /// Only this device's messages.
        #[arg(long, short = 'd')]
        device_id: Option<String>,
        /// Extra sections to show (space-separated): sys, app, anno, all.
        #[arg(long, short = 'p', visible_alias = "props", value_delimiter = ' ', num_args = 0.., value_parser = ["sys", "app", "anno", "all"])]
        properties: Vec<String>,
        /// Stop once this many seconds pass without a message (counted from the start, then
        /// from the last message, as az); 0 or absent: run until stopped.
        #[arg(long, short = 't', visible_alias = "to")]
        timeout: Option<u64>,
        /// Replay from this stream position (1 = the beginning) before following live.
        #[arg(long)]
        from: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum DeviceIdentity {
    /// List the hub's device identities.
    List {
        #[command(flatten)]
        target: HubTarget,
        /// At most this many identities (all of them without it), paged through 1,000 at a time.
        #[arg(long)]
        top: Option<usize>,
        /// Include each device's symmetric keys (left out by default: a list is for looking at
        /// many devices, and keys in a terminal or a log are keys given away).
        #[arg(long)]
        show_keys: bool,
    },
    /// Show a device identity (keys, status, connection state).
    Show {
        #[command(flatten)]
        target: HubTarget,
        /// Id of the device.
        #[arg(long, short = 'd')]
        device_id: String,
    },
    /// Create a device identity with symmetric keys (generated unless given).
    Create {
        #[command(flatten)]
        target: HubTarget,
        /// Id of the device.
        #[arg(long, short = 'd')]
        device_id: String,
        /// The device's primary symmetric key, base64 (generated unless given).
        #[arg(long, visible_alias = "pk")]
        primary_key: Option<String>,
        /// The device's secondary symmetric key, base64 (generated unless given).
        #[arg(long, visible_alias = "sk")]
        secondary_key: Option<String>,
        /// Whether the device may connect.
        #[arg(long, visible_alias = "sta", default_value = "enabled", value_parser = ["enabled", "disabled"])]
        status: String,
    },
    /// Enable or disable a device (disabling disconnects it).
    Update {
        #[command(flatten)]
        target: HubTarget,
        /// Id of the device.
        #[arg(long, short = 'd')]
        device_id: String,
        /// enabled, or disabled to refuse and disconnect the device.
        #[arg(long, visible_alias = "sta", value_parser = ["enabled", "disabled"])]
        status: String,
    },
    /// Delete device identities: the ones named, or every one with `--all --yes`. With more
    /// than one, prints a result per device and goes on past a failure (exit status 1 then).
    Delete {
        #[command(flatten)]
        target: HubTarget,
        /// Id(s) of the device(s) to delete (space-separated).
        #[arg(long, short = 'd', num_args = 1.., required_unless_present = "all", conflicts_with = "all")]
        device_id: Vec<String>,
        /// Delete every device identity of the hub (needs --yes).
        #[arg(long)]
        all: bool,
        /// Confirm deleting every device identity (with --all).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Subcommand)]
pub enum DeviceTwin {
    /// Show a device's twin: tags, desired and reported properties.
    Show {
        #[command(flatten)]
        target: HubTarget,
        /// Id of the device.
        #[arg(long, short = 'd')]
        device_id: String,
    },
    /// Patch desired properties and/or tags.
    Update {
        #[command(flatten)]
        target: HubTarget,
        /// Id of the device.
        #[arg(long, short = 'd')]
        device_id: String,
        /// Desired properties patch (JSON object, inline or `@file.json`; null removes a property).
        #[arg(long, value_parser = at_file::json)]
        desired: Option<Value>,
        /// Tags patch (JSON object, inline or `@file.json`).
        #[arg(long, value_parser = at_file::json)]
        tags: Option<Value>,
        /// Only update the twin if it still has this etag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum C2dMessage {
    /// Queue a cloud-to-device message for a device.
    Send {
        #[command(flatten)]
        target: HubTarget,
        /// Id of the device.
        #[arg(long, short = 'd')]
        device_id: String,
        /// Message body: text, or `@file` for a file's text (`@-`: standard input).
        #[arg(long, visible_alias = "da", default_value = "Ping from Fleetgate CLI", value_parser = at_file::text)]
        data: String,
        /// Message id (system property message-id).
        #[arg(long, visible_alias = "mid")]
        message_id: Option<String>,
        /// Correlation id (system property correlation-id).
        #[arg(long, visible_alias = "cid")]
        correlation_id: Option<String>,
        /// Content type (system property content-type), e.g. application/json.
        #[arg(long, visible_alias = "ct")]
        content_type: Option<String>,
        /// Content encoding (system property content-encoding), e.g. utf-8.
        #[arg(long, visible_alias = "ce")]
        content_encoding: Option<String>,
        /// Application properties as `k1=v1;k2=v2`.
        #[arg(long, short = 'p', visible_alias = "properties")]
        props: Option<String>,
        /// Time to live in seconds (default 1 hour, at most 2 days).
        #[arg(long)]
        ttl: Option<u64>,
    },
}

pub async fn run(cmd: HubCommand) -> anyhow::Result<()> {
    match cmd {
        HubCommand::List { data_dir } => {
            let inst = fleetgate_server::Instance::read(&data_dir).context("run `fleetgate serve` once first")?;
            print_result(&serde_json::to_value(&inst.hubs)?)?;
        }
        HubCommand::Create { target, hostname } => {
            print_result(&super::linked_hubs::create(&target, &hostname).await?)?;
        }
        HubCommand::DeviceIdentity(c) => device_identity(c).await?,
        HubCommand::DeviceTwin(c) => device_twin(c).await?,
        HubCommand::InvokeDeviceMethod { target, device_id, method_name, method_payload, timeout } => {
            let r = target
                .client()?
                .invoke_method(&device_id, &method_name, method_payload, timeout)
                .await
                .map_err(describe)?;
            print_result(&r)?;
        }
        HubCommand::C2dMessage(C2dMessage::Send {
            target,
            device_id,
            data,
            message_id,
            correlation_id,
            content_type,
            content_encoding,
            props,
            ttl,
        }) => {
            let mut properties = Vec::new();
            for pair in props.as_deref().unwrap_or("").split(';').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| anyhow!("--props entry '{pair}' is not k=v"))?;
                properties.push((k.to_owned(), v.to_owned()));
            }
            let o = C2dOptions {
                message_id,
                correlation_id,
                content_type,
                content_encoding,
                ttl: ttl.map(Duration::from_secs),
                properties,
            };
            target.client()?.send_c2d(&device_id, data.into_bytes(), &o).await.map_err(describe)?;
        }
        HubCommand::MonitorEvents { target, device_id, properties, timeout, from } => {
            let show = |s: &str| properties.iter().any(|p| p == s || p == "all");
            let (sys, app, anno) = (show("sys"), show("app"), show("anno"));
            eprintln!("Starting event monitor, use ctrl-c to stop...");
            let mut failure = None;
            target
                .client()?
                .monitor_events(from, device_id.as_deref(), timeout.filter(|&t| t > 0).map(Duration::from_secs), |v| {
                    // Each event goes through --query and -o as it comes; a query that fails
                    // on one is reported and stops the monitor.
                    match print_result(&shape_event(v, sys, app, anno)) {
                        Ok(()) => true,
                        Err(e) => {
                            failure = Some(e);
                            false
                        }
                    }
                })
                .await
                .map_err(describe)?;
            if let Some(e) = failure {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// az's shape: origin/module/interface/component/payload, with the requested sections.
fn shape_event(v: Value, sys: bool, app: bool, anno: bool) -> Value {
    let e = &v["event"];
    let mut out = json!({
        "origin": e["origin"], "module": e["module"], "interface": e["interface"], "component": e["component"],
    });
    if sys || app {
        let mut p = serde_json::Map::new();
        if sys {
            p.insert("system".into(), e["properties"]["system"].clone());
        }
        if app {
            p.insert("application".into(), e["properties"]["application"].clone());
        }
        out["properties"] = Value::Object(p);
    }
    if anno {
        out["annotations"] = e["annotations"].clone();
    }
    out["payload"] = e["payload"].clone();
    // A body that is not UTF-8 comes as base64 text, marked beside the payload so it cannot be
    // taken for a text body that happens to look like base64.
    if let Some(encoding) = e.get("payloadEncoding") {
        out["payloadEncoding"] = encoding.clone();
    }
    json!({ "event": out })
}

/// Leaves each device's `authentication.symmetricKey` keys out of a device list (as `null`, the
/// value Azure gives a device without keys), keeping everything else.
fn redact_keys(devices: &mut serde_json::Value) {
    for d in devices.as_array_mut().into_iter().flatten() {
        if let Some(keys) = d.pointer_mut("/authentication/symmetricKey").and_then(|k| k.as_object_mut()) {
            for v in keys.values_mut() {
                *v = serde_json::Value::Null;
            }
        }
    }
}

async fn device_identity(c: DeviceIdentity) -> anyhow::Result<()> {
    match c {
        DeviceIdentity::List { target, top, show_keys } => {
            let mut devices = target.client()?.list_devices(top).await.map_err(describe)?;
            if !show_keys {
                redact_keys(&mut devices);
            }
            print_result(&devices)?;
        }
        DeviceIdentity::Show { target, device_id } => {
            print_result(&target.client()?.get_device(&device_id).await.map_err(describe)?)?;
        }
        DeviceIdentity::Create { target, device_id, primary_key, secondary_key, status } => {
            let mut d =
                json!({"deviceId": device_id, "status": status, "authentication": {"type": "sas", "symmetricKey": {}}});
            if let Some(k) = primary_key {
                d["authentication"]["symmetricKey"]["primaryKey"] = k.into();
            }
            if let Some(k) = secondary_key {
                d["authentication"]["symmetricKey"]["secondaryKey"] = k.into();
            }
            print_result(&target.client()?.create_device(&d).await.map_err(describe)?)?;
        }
        DeviceIdentity::Update { target, device_id, status } => {
            let c = target.client()?;
            let mut d = c.get_device(&device_id).await.map_err(describe)?;
            let etag = d["etag"].as_str().unwrap_or("*").to_owned();
            d["status"] = status.into();
            print_result(&c.update_device(&d, &etag).await.map_err(describe)?)?;
        }
        DeviceIdentity::Delete { target, device_id, all, yes } => {
            let c = target.client()?;
            if let [one] = device_id.as_slice() {
                return c.delete_device(one).await.map_err(describe);
            }
            let ids = if all {
                let devices = c.list_devices(None).await.map_err(describe)?;
                let ids: Vec<String> = devices
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d["deviceId"].as_str().map(str::to_owned))
                    .collect();
                super::bulk::confirm(yes, ids.len(), "device identities of the hub")?;
                ids
            } else {
                device_id
            };
            let mut results = Vec::new();
            for id in ids {
                results.push((id.clone(), c.delete_device(&id).await.map_err(describe)));
            }
            super::bulk::report("deviceId", results)?;
        }
    }
    Ok(())
}

async fn device_twin(c: DeviceTwin) -> anyhow::Result<()> {
    match c {
        DeviceTwin::Show { target, device_id } => {
            print_result(&target.client()?.get_twin(&device_id).await.map_err(describe)?)?;
        }
        DeviceTwin::Update { target, device_id, desired, tags, etag } => {
            if desired.is_none() && tags.is_none() {
                bail!("give --desired and/or --tags");
            }
            let mut patch = json!({});
            if let Some(d) = desired {
                patch["properties"] = json!({"desired": d});
            }
            if let Some(t) = tags {
                patch["tags"] = t;
            }
            print_result(&target.client()?.patch_twin(&device_id, &patch, etag.as_deref()).await.map_err(describe)?)?;
        }
    }
    Ok(())
}
