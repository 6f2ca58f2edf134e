//! `fleetgate linked-hub ...`: the hubs linked to the instance and their allocation settings
//! (`az iot dps linked-hub`), through the running server's service API (`/linkedHubs`, the
//! owner policy's `ServiceConfig` right): the server is the one path that changes them, so the
//! next registration sees a change at once.

use clap::Subcommand;
use serde_json::{json, Value};

use super::{client, describe, print_result};
use crate::Target;

#[derive(Subcommand)]
pub enum LinkedHubCommand {
    /// List linked hubs with their allocation settings.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Link a new hub (same as `fleetgate hub create`).
    Create {
        #[command(flatten)]
        target: Target,
        /// Host name of the hub to link.
        #[arg(long)]
        hostname: String,
    },
    /// Unlink a hub that has no device identities (never the last one). Devices provisioned to
    /// it were told its name; delete their identities and provision them again first.
    Delete {
        #[command(flatten)]
        target: Target,
        /// Host name of the hub to unlink.
        #[arg(long)]
        hostname: String,
    },
    /// Change a hub's allocation weight, whether it applies allocation policies, and the latency
    /// estimate geoLatency allocation uses.
    Update {
        #[command(flatten)]
        target: Target,
        /// Host name of the linked hub to change.
        #[arg(long)]
        hostname: String,
        /// The hub's share of devices under evenlyDistributed allocation, relative to the other hubs' weights.
        #[arg(long)]
        allocation_weight: Option<u32>,
        /// Whether allocation policies may assign devices to this hub (true or false).
        #[arg(long)]
        apply_allocation_policy: Option<bool>,
        /// Latency estimate to this hub in milliseconds, used by geoLatency allocation.
        #[arg(long)]
        latency_ms: Option<u32>,
    },
}

pub async fn run(cmd: LinkedHubCommand) -> anyhow::Result<()> {
    match cmd {
        LinkedHubCommand::List { target } => {
            let hubs = client(&target)?.list_linked_hubs().await.map_err(describe)?;
            print_result(&Value::Array(hubs))?;
        }
        LinkedHubCommand::Create { target, hostname } => print_result(&create(&target, &hostname).await?)?,
        LinkedHubCommand::Delete { target, hostname } => {
            client(&target)?.delete_linked_hub(&hostname).await.map_err(describe)?;
            print_result(&json!({ "name": hostname, "deleted": true }))?;
        }
        LinkedHubCommand::Update { target, hostname, allocation_weight, apply_allocation_policy, latency_ms } => {
            let settings = json!({
                "allocationWeight": allocation_weight,
                "applyAllocationPolicy": apply_allocation_policy,
                "latencyMs": latency_ms,
            });
            let mut hub = client(&target)?.put_linked_hub(&hostname, &settings, true).await.map_err(describe)?;
            // The answer carries the owner key; an update shows only the settings.
            if let Some(o) = hub.as_object_mut() {
                o.remove("connectionString");
            }
            print_result(&hub)?;
        }
    }
    Ok(())
}

/// Links hub `hostname` (also `fleetgate hub create`): its name and `iothubowner` connection
/// string, as `instance.json` lists it.
pub async fn create(target: &Target, hostname: &str) -> anyhow::Result<Value> {
    let c = client(target)?;
    if c.list_linked_hubs()
        .await
        .map_err(describe)?
        .iter()
        .any(|h| h.get("name").and_then(Value::as_str).is_some_and(|n| n.eq_ignore_ascii_case(hostname.trim())))
    {
        anyhow::bail!("hub '{}' already exists", hostname.trim());
    }
    let hub = c.put_linked_hub(hostname, &json!({}), false).await.map_err(describe)?;
    Ok(json!({ "hostName": hub["name"], "connectionString": hub["connectionString"] }))
}
