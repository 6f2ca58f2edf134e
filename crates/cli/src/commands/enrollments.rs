//! `fleetgate enrollment ...`: individual enrollments, mirroring `az iot dps enrollment`.

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::{json, Value};

use super::enrollment_args::EnrollmentArgs;
use super::{client, describe, print_result};
use crate::Target;

#[derive(Subcommand)]
pub enum EnrollmentCommand {
    /// Create an individual enrollment: symmetric keys (generated unless given), or X.509 with
    /// `--certificate-path` (the device's own certificate, matched by thumbprint).
    Create {
        #[command(flatten)]
        target: Target,
        /// Registration id of the individual enrollment (az: --enrollment-id).
        #[arg(long, visible_aliases = ["enrollment-id", "eid"])]
        registration_id: String,
        /// The device id to create in the hub (default: the registration id).
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        options: EnrollmentArgs,
    },
    /// Change an enrollment; options not given are kept (keys included).
    Update {
        #[command(flatten)]
        target: Target,
        /// Registration id of the individual enrollment (az: --enrollment-id).
        #[arg(long, visible_aliases = ["enrollment-id", "eid"])]
        registration_id: String,
        /// The device id to give the device in the hub (kept unless given).
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        options: EnrollmentArgs,
        /// Only update the enrollment if it still has this etag (default: its current one).
        #[arg(long)]
        etag: Option<String>,
    },
    /// Show an individual enrollment; `--show-keys` adds its keys.
    Show {
        #[command(flatten)]
        target: Target,
        /// Registration id of the individual enrollment (az: --enrollment-id).
        #[arg(long, visible_aliases = ["enrollment-id", "eid"])]
        registration_id: String,
        /// Include the enrollment's keys in the output.
        #[arg(long, visible_alias = "keys")]
        show_keys: bool,
    },
    /// List every individual enrollment.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Delete an individual enrollment: its device can no longer register.
    Delete {
        #[command(flatten)]
        target: Target,
        /// Registration id of the individual enrollment (az: --enrollment-id).
        #[arg(long, visible_aliases = ["enrollment-id", "eid"])]
        registration_id: String,
        /// Only delete the enrollment if it still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
}

pub async fn run(cmd: EnrollmentCommand) -> anyhow::Result<()> {
    match cmd {
        EnrollmentCommand::Create { target, registration_id, device_id, mut options } => {
            options.provisioning_status.get_or_insert_with(|| "enabled".into());
            let mut e = json!({ "registrationId": registration_id });
            if let Some(d) = device_id {
                e["deviceId"] = d.into();
            }
            options.apply(&mut e)?;
            let c = client(&target)?;
            match c.get_enrollment(&registration_id).await {
                Ok(_) => return Err(anyhow!("an enrollment for '{registration_id}' already exists")),
                Err(err) if fleetgate_client::service::is_not_found(&err) => {}
                Err(err) => return Err(describe(err)),
            }
            print_result(&c.put_enrollment(&e, None).await.map_err(describe)?)?;
        }
        EnrollmentCommand::Update { target, registration_id, device_id, options, etag } => {
            let c = client(&target)?;
            let mut e = c.get_enrollment(&registration_id).await.map_err(describe)?;
            let etag = etag.or_else(|| e.get("etag").and_then(Value::as_str).map(str::to_owned));
            if let Some(d) = device_id {
                e["deviceId"] = d.into();
            }
            if let Some(obj) = e.as_object_mut() {
                obj.remove("registrationState");
            }
            options.apply(&mut e)?;
            print_result(&c.put_enrollment(&e, etag.as_deref()).await.map_err(describe)?)?;
        }
        EnrollmentCommand::Show { target, registration_id, show_keys } => {
            let c = client(&target)?;
            let mut e = c.get_enrollment(&registration_id).await.map_err(describe)?;
            if show_keys {
                e["attestation"] = c.enrollment_attestation(&registration_id).await.map_err(describe)?;
            }
            print_result(&e)?;
        }
        EnrollmentCommand::List { target } => {
            print_result(&Value::Array(client(&target)?.list_enrollments().await.map_err(describe)?))?;
        }
        EnrollmentCommand::Delete { target, registration_id, etag } => {
            client(&target)?.delete_enrollment(&registration_id, etag.as_deref()).await.map_err(describe)?;
        }
    }
    Ok(())
}
