//! The service side: create a symmetric-key enrollment group (unless it exists), print the
//! device key derived from its key for a registration id, and list the group's registrations.
//!
//! ```text
//! cargo run -p fleetgate-client --example enroll_group -- \
//!     --connection-string "HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=..." \
//!     --ca fleetgate-data/ca.pem --group-id sensors [--registration-id sensor-1]
//! ```
//!
//! The options can come from `FLEETGATE_CONNECTION_STRING`, `FLEETGATE_CA_CERT`,
//! `FLEETGATE_GROUP_ID` and `FLEETGATE_REGISTRATION_ID` instead. The connection string is the
//! `serviceConnectionString` of `fleetgate-data/instance.json`.

use fleetgate_client::{ConnectionString, DpsServiceClient, EnrollmentGroup, Error};

const USAGE: &str = "usage: enroll_group --connection-string CS --ca CA.PEM --group-id G [--registration-id R]
(each option also from FLEETGATE_CONNECTION_STRING, FLEETGATE_CA_CERT, FLEETGATE_GROUP_ID, FLEETGATE_REGISTRATION_ID)";

/// What the example needs, from the command line or the environment.
pub struct Settings {
    pub connection_string: ConnectionString,
    pub ca_pem: Vec<u8>,
    pub group_id: String,
    pub registration_id: Option<String>,
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
        let ca_path = need("ca", "FLEETGATE_CA_CERT")?;
        Ok(Settings {
            connection_string: need("connection-string", "FLEETGATE_CONNECTION_STRING")?
                .parse()
                .map_err(|e| format!("--connection-string: {e}"))?,
            ca_pem: std::fs::read(&ca_path).map_err(|e| format!("reading {ca_path}: {e}"))?,
            group_id: need("group-id", "FLEETGATE_GROUP_ID")?,
            registration_id: get("registration-id", "FLEETGATE_REGISTRATION_ID"),
        })
    }
}

/// Creates the group unless it exists; returns its primary key (base64).
pub async fn run(s: &Settings) -> Result<String, Error> {
    let dps = DpsServiceClient::new(s.connection_string.clone(), Some(&s.ca_pem))?;
    match dps.get_enrollment_group(&s.group_id).await {
        Ok(g) => println!("group {} exists (etag {})", g.enrollment_group_id, g.etag.unwrap_or_default()),
        // Not there yet: create it; the service generates the keys.
        Err(Error::NotFound(_)) => {
            let g = dps.put_enrollment_group(&EnrollmentGroup::symmetric_key(&s.group_id), None).await?;
            println!("created group {}", g.enrollment_group_id);
        }
        Err(e) => return Err(e),
    }
    // Reads leave keys out; the attestation call gives them.
    let keys = dps.enrollment_group_attestation(&s.group_id).await?;
    let primary = keys
        .symmetric_key
        .and_then(|k| k.primary_key)
        .ok_or_else(|| Error::Protocol(format!("group {} has no symmetric key", s.group_id)))?;
    if let Some(reg) = &s.registration_id {
        let device_key = fleetgate_client::derive_device_key(&primary, reg).expect("the service's key is base64");
        println!("device key for {reg}: {}", device_key.to_base64());
    }
    for r in dps.list_registrations(&s.group_id).await? {
        println!("registered: {} {} on {}", r.registration_id, r.status, r.assigned_hub.unwrap_or_default());
    }
    Ok(primary)
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
        eprintln!("error: {}", e.detail());
        std::process::exit(1);
    }
}
