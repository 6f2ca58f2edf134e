//! Provision a device through a symmetric-key enrollment group, then send telemetry to the hub
//! DPS assigned it to.
//!
//! ```text
//! cargo run -p fleetgate-client --example provision_and_send -- \
//!     --id-scope 0ne0000A1B2 --registration-id sensor-1 --group-key <base64> \
//!     --ca fleetgate-data/ca.pem [--host localhost] [--port 8883] [--messages 3]
//! ```
//!
//! Every option can come from the environment instead (`FLEETGATE_ID_SCOPE`,
//! `FLEETGATE_REGISTRATION_ID`, `FLEETGATE_GROUP_KEY` or `FLEETGATE_DEVICE_KEY`,
//! `FLEETGATE_CA_CERT`, `FLEETGATE_HOST`, `FLEETGATE_MQTT_PORT`, `FLEETGATE_MESSAGES`). The ID
//! scope and the group key are in `fleetgate-data/instance.json` and
//! `fleetgate enrollment-group show --group-id G --show-keys`.

use std::time::Duration;

use fleetgate_client::{register, HubClient, HubOptions, Properties, RegisterOptions, SymmetricKey};

const USAGE: &str = "usage: provision_and_send --id-scope SCOPE --registration-id ID \
(--group-key BASE64 | --device-key BASE64) --ca CA.PEM [--host HOST] [--port PORT] \
[--server-name NAME] [--messages N]
(each option also from FLEETGATE_ID_SCOPE, FLEETGATE_REGISTRATION_ID, FLEETGATE_GROUP_KEY, \
FLEETGATE_DEVICE_KEY, FLEETGATE_CA_CERT, FLEETGATE_HOST, FLEETGATE_MQTT_PORT, \
FLEETGATE_SERVER_NAME, FLEETGATE_MESSAGES)";

/// What the example needs, from the command line or the environment.
pub struct Settings {
    /// Where DPS and the hub listen (both on the MQTT port, as in Fleetgate).
    pub host: String,
    pub port: u16,
    /// The name the server's certificate carries, when `host` is an address (`127.0.0.1`).
    pub server_name: Option<String>,
    pub ca_pem: Vec<u8>,
    pub id_scope: String,
    pub registration_id: String,
    /// The device's own key: given, or derived from the group key.
    pub device_key: SymmetricKey,
    pub messages: u32,
}

impl Settings {
    /// Reads `--name value` options, falling back to `env(NAME)`.
    pub fn from_args(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, String> {
        let mut given = std::collections::HashMap::new();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let name = flag.strip_prefix("--").ok_or_else(|| format!("unexpected argument '{flag}'"))?;
            let value = args.next().ok_or_else(|| format!("--{name} needs a value"))?;
            given.insert(name.to_owned(), value);
        }
        let get = |name: &str, var: &str| given.get(name).cloned().or_else(|| env(var));
        let need = |name: &str, var: &str| get(name, var).ok_or_else(|| format!("missing --{name} (or {var})"));

        let registration_id = need("registration-id", "FLEETGATE_REGISTRATION_ID")?;
        let device_key = match (get("device-key", "FLEETGATE_DEVICE_KEY"), get("group-key", "FLEETGATE_GROUP_KEY")) {
            (Some(k), _) => SymmetricKey::from_base64(&k).map_err(|e| format!("--device-key: {e}"))?,
            // A group enrollment: each device's key is HMAC-SHA256(group key, registration id).
            (None, Some(k)) => {
                fleetgate_client::derive_device_key(&k, &registration_id).map_err(|e| format!("--group-key: {e}"))?
            }
            (None, None) => return Err("missing --group-key or --device-key".into()),
        };
        let ca_path = need("ca", "FLEETGATE_CA_CERT")?;
        let ca_pem = std::fs::read(&ca_path).map_err(|e| format!("reading {ca_path}: {e}"))?;
        let number = |name: &str, var: &str, default: u32| -> Result<u32, String> {
            get(name, var).map_or(Ok(default), |v| v.parse().map_err(|_| format!("--{name}: not a number: {v}")))
        };
        Ok(Settings {
            host: get("host", "FLEETGATE_HOST").unwrap_or_else(|| "localhost".into()),
            port: number("port", "FLEETGATE_MQTT_PORT", 8883)?
                .try_into()
                .map_err(|_| "--port: out of range".to_owned())?,
            server_name: get("server-name", "FLEETGATE_SERVER_NAME"),
            ca_pem,
            id_scope: need("id-scope", "FLEETGATE_ID_SCOPE")?,
            registration_id,
            device_key,
            messages: number("messages", "FLEETGATE_MESSAGES", 3)?,
        })
    }
}

/// What happened: where the device went and how many messages the hub acknowledged.
pub struct Outcome {
    pub assigned_hub: String,
    pub device_id: String,
    pub sent: u32,
}

/// Registers, connects to the assigned hub and sends `messages` telemetry messages.
pub async fn run(s: &Settings) -> Result<Outcome, fleetgate_client::Error> {
    // 1. Register with DPS: it checks the key and assigns the device to a hub.
    let mut reg =
        RegisterOptions::new(&s.host, s.ca_pem.clone(), &s.id_scope, &s.registration_id, s.device_key.clone());
    reg.port = s.port;
    reg.server_name = s.server_name.clone();
    let assigned = register(&reg).await?;
    println!("registered {} -> device {} on hub {}", s.registration_id, assigned.device_id, assigned.assigned_hub);

    // 2. Connect to the assigned hub with the same key. `hub_host_name` is the hub's name as DPS
    // gave it (used in the token); `host` is where to connect (Fleetgate serves both on one port).
    let mut hub =
        HubOptions::new(&s.host, s.ca_pem.clone(), &assigned.assigned_hub, &assigned.device_id, s.device_key.clone());
    hub.port = s.port;
    hub.server_name = s.server_name.clone();
    let client = HubClient::connect(&hub).await?;

    // 3. Send telemetry: each call resolves once the hub has acknowledged the message.
    let mut sent = 0;
    for n in 0..s.messages {
        let mut props = Properties::default();
        props.system.insert("content-type".into(), "application/json".into());
        props.system.insert("content-encoding".into(), "utf-8".into());
        props.application.insert("example".into(), "provision_and_send".into());
        let body = format!(r#"{{"n":{n},"temperature":{:.1}}}"#, 20.0 + f64::from(n) * 0.5);
        client.send_telemetry(body.into_bytes(), &props).await?;
        sent += 1;
        println!("sent message {n}");
        if n + 1 < s.messages {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    client.disconnect().await?;
    Ok(Outcome { assigned_hub: assigned.assigned_hub, device_id: assigned.device_id, sent })
}

#[tokio::main]
async fn main() {
    let settings = match Settings::from_args(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&settings).await {
        // `detail` adds the causes (I/O, TLS) to the message.
        eprintln!("error: {}", e.detail());
        if let fleetgate_client::Error::Unauthorized(_) = e {
            eprintln!("hint: the key is not accepted; for a group, pass the group key (--group-key), not a device key");
        }
        std::process::exit(1);
    }
}
