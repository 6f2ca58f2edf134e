//! `fleetgate enrollment-group ...`, mirroring `az iot dps enrollment-group`.

use anyhow::{anyhow, Context};
use clap::Subcommand;
use serde_json::{json, Value};

use super::{client, describe, print_json};
use crate::Target;

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a symmetric-key enrollment group (keys are generated unless given).
    Create {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        group_id: String,
        #[arg(long)]
        primary_key: Option<String>,
        #[arg(long)]
        secondary_key: Option<String>,
        /// Hub to assign devices to (static allocation); default: any linked hub.
        #[arg(long)]
        iot_hub: Option<String>,
        /// Initial twin JSON: {"tags":{...},"properties":{"desired":{...}}}.
        #[arg(long)]
        initial_twin: Option<String>,
        #[arg(long, default_value = "enabled", value_parser = ["enabled", "disabled"])]
        provisioning_status: String,
    },
    /// Change a group (provisioning status, hub, initial twin); keys are kept.
    Update {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        group_id: String,
        #[arg(long, value_parser = ["enabled", "disabled"])]
        provisioning_status: Option<String>,
        #[arg(long)]
        iot_hub: Option<String>,
        #[arg(long)]
        initial_twin: Option<String>,
        /// Only update if the group still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Show a group; `--show-keys` adds its keys.
    Show {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        group_id: String,
        #[arg(long)]
        show_keys: bool,
    },
    /// List every group.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a group (its registration records stay, as in Azure).
    Delete {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        group_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
}

fn parse_twin(s: &Option<String>) -> anyhow::Result<Option<Value>> {
    s.as_deref().map(|t| serde_json::from_str(t).context("--initial-twin is not valid JSON")).transpose()
}

pub async fn run(cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Create {
            target,
            group_id,
            primary_key,
            secondary_key,
            iot_hub,
            initial_twin,
            provisioning_status,
        } => {
            let mut sk = serde_json::Map::new();
            if let Some(k) = primary_key {
                sk.insert("primaryKey".into(), k.into());
            }
            if let Some(k) = secondary_key {
                sk.insert("secondaryKey".into(), k.into());
            }
            let mut g = json!({
                "enrollmentGroupId": group_id,
                "attestation": {"type": "symmetricKey", "symmetricKey": sk},
                "provisioningStatus": provisioning_status,
            });
            if let Some(h) = iot_hub {
                g["iotHubHostName"] = h.into();
                g["allocationPolicy"] = "static".into();
            }
            if let Some(t) = parse_twin(&initial_twin)? {
                g["initialTwin"] = t;
            }
            let c = client(&target)?;
            // Create means create: refuse to overwrite an existing group.
            match c.get_enrollment_group(&group_id).await {
                Ok(_) => return Err(anyhow!("enrollment group '{group_id}' already exists")),
                Err(e) if fleetgate_client::service::is_not_found(&e) => {}
                Err(e) => return Err(describe(e)),
            }
            print_json(&c.put_enrollment_group(&g, None).await.map_err(describe)?);
        }
        GroupCommand::Update { target, group_id, provisioning_status, iot_hub, initial_twin, etag } => {
            let c = client(&target)?;
            let mut g = c.get_enrollment_group(&group_id).await.map_err(describe)?;
            let etag = etag.or_else(|| g.get("etag").and_then(Value::as_str).map(str::to_owned));
            if let Some(s) = provisioning_status {
                g["provisioningStatus"] = s.into();
            }
            if let Some(h) = iot_hub {
                g["iotHubHostName"] = h.into();
                g["allocationPolicy"] = "static".into();
            }
            if let Some(t) = parse_twin(&initial_twin)? {
                g["initialTwin"] = t;
            }
            print_json(&c.put_enrollment_group(&g, etag.as_deref()).await.map_err(describe)?.clone());
        }
        GroupCommand::Show { target, group_id, show_keys } => {
            let c = client(&target)?;
            let mut g = c.get_enrollment_group(&group_id).await.map_err(describe)?;
            if show_keys {
                g["attestation"] = c.enrollment_group_attestation(&group_id).await.map_err(describe)?;
            }
            print_json(&g);
        }
        GroupCommand::List { target } => {
            let c = client(&target)?;
            print_json(&Value::Array(c.list_enrollment_groups().await.map_err(describe)?));
        }
        GroupCommand::Delete { target, group_id, etag } => {
            let c = client(&target)?;
            let orphans = c.list_registrations(&group_id).await.map(|r| r.len()).unwrap_or(0);
            c.delete_enrollment_group(&group_id, etag.as_deref()).await.map_err(describe)?;
            if orphans > 0 {
                eprintln!("warning: {orphans} registration record(s) of '{group_id}' remain; delete them with `fleetgate registration delete`.");
            }
        }
    }
    Ok(())
}
