//! `fleetgate enrollment-group ...`, mirroring `az iot dps enrollment-group`.

use anyhow::anyhow;
use clap::Subcommand;
use fleetgate_core::keys::SymmetricKey;
use serde_json::{json, Value};

use super::enrollment_args::EnrollmentArgs;
use super::{client, describe, print_result};
use crate::Target;

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create an enrollment group: symmetric keys (generated unless given), or X.509 with
    /// `--certificate-path` (the root or intermediate CA the devices' certificates chain to).
    Create {
        #[command(flatten)]
        target: Target,
        /// Id of the enrollment group.
        #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"])]
        group_id: String,
        #[command(flatten)]
        options: EnrollmentArgs,
    },
    /// Change a group; options not given are kept (keys included).
    Update {
        #[command(flatten)]
        target: Target,
        /// Id of the enrollment group.
        #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"])]
        group_id: String,
        #[command(flatten)]
        options: EnrollmentArgs,
        /// Only update if the group still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Roll the keys: a new primary key, the old primary becomes the secondary. Devices whose
    /// keys derive from the old primary keep working until the next roll.
    RollKeys {
        #[command(flatten)]
        target: Target,
        /// Id of the enrollment group.
        #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"])]
        group_id: String,
    },
    /// Show a group; `--show-keys` adds its keys.
    Show {
        #[command(flatten)]
        target: Target,
        /// Id of the enrollment group.
        #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"])]
        group_id: String,
        /// Include the group's keys in the output.
        #[arg(long, visible_alias = "keys")]
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
        /// Id of the enrollment group.
        #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"])]
        group_id: String,
        /// Only delete the group if it still has this etag.
        #[arg(long)]
        etag: Option<String>,
    },
}

pub async fn run(cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Create { target, group_id, mut options } => {
            options.provisioning_status.get_or_insert_with(|| "enabled".into());
            let mut g = json!({ "enrollmentGroupId": group_id });
            options.apply(&mut g)?;
            let c = client(&target)?;
            // Create means create: refuse to overwrite an existing group.
            match c.get_enrollment_group(&group_id).await {
                Ok(_) => return Err(anyhow!("enrollment group '{group_id}' already exists")),
                Err(e) if fleetgate_client::service::is_not_found(&e) => {}
                Err(e) => return Err(describe(e)),
            }
            print_result(&c.put_enrollment_group(&g, None).await.map_err(describe)?)?;
        }
        GroupCommand::Update { target, group_id, options, etag } => {
            let c = client(&target)?;
            let mut g = c.get_enrollment_group(&group_id).await.map_err(describe)?;
            let etag = etag.or_else(|| g.get("etag").and_then(Value::as_str).map(str::to_owned));
            options.apply(&mut g)?;
            print_result(&c.put_enrollment_group(&g, etag.as_deref()).await.map_err(describe)?)?;
        }
        GroupCommand::RollKeys { target, group_id } => {
            let c = client(&target)?;
            let mut g = c.get_enrollment_group(&group_id).await.map_err(describe)?;
            if g["attestation"]["type"] != "symmetricKey" {
                return Err(anyhow!("'{group_id}' does not use symmetric keys; replace its certificates with `update --certificate-path`"));
            }
            let etag = g.get("etag").and_then(Value::as_str).map(str::to_owned);
            let keys = c.enrollment_group_attestation(&group_id).await.map_err(describe)?;
            let old_primary = keys["symmetricKey"]["primaryKey"].clone();
            g["attestation"] = json!({"type": "symmetricKey", "symmetricKey": {
                "primaryKey": SymmetricKey::generate().to_base64(),
                "secondaryKey": old_primary,
            }});
            print_result(&c.put_enrollment_group(&g, etag.as_deref()).await.map_err(describe)?)?;
        }
        GroupCommand::Show { target, group_id, show_keys } => {
            let c = client(&target)?;
            let mut g = c.get_enrollment_group(&group_id).await.map_err(describe)?;
            if show_keys {
                g["attestation"] = c.enrollment_group_attestation(&group_id).await.map_err(describe)?;
            }
            print_result(&g)?;
        }
        GroupCommand::List { target } => {
            let c = client(&target)?;
            print_result(&Value::Array(c.list_enrollment_groups().await.map_err(describe)?))?;
        }
        GroupCommand::Delete { target, group_id, etag } => {
            let c = client(&target)?;
            let orphans = c.list_registrations(&group_id).await.map(|r| r.len()).unwrap_or(0);
            c.delete_enrollment_group(&group_id, etag.as_deref()).await.map_err(describe)?;
            if orphans > 0 {
                eprintln!(
                    "warning: {orphans} registration record(s) of '{group_id}' remain; delete them with `fleetgate registration delete --group-id {group_id} --all --yes`."
                );
            }
        }
    }
    Ok(())
}
