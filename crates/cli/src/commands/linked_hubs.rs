//! `fleetgate linked-hub ...`: the hubs linked to the local instance and their allocation
//! settings (`az iot dps linked-hub`). Linked hubs belong to Azure's control plane, so these
//! verbs work on the data directory rather than through the service API; a running server picks
//! changes up at the next registration.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Subcommand;
use fleetgate_store::{SqliteStore, Store};
use serde_json::json;

use super::print_result;

#[derive(Subcommand)]
pub enum LinkedHubCommand {
    /// List linked hubs with their allocation settings.
    List {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
    },
    /// Link a new hub (same as `fleetgate hub create`).
    Create {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
        /// Host name of the hub to link.
        #[arg(long)]
        hostname: String,
    },
    /// Unlink a hub that has no device identities (never the last one). Devices provisioned to
    /// it were told its name; delete their identities and provision them again first.
    Delete {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
        /// Host name of the hub to unlink.
        #[arg(long)]
        hostname: String,
    },
    /// Change a hub's allocation weight, whether it applies allocation policies, and the latency
    /// estimate geoLatency allocation uses.
    Update {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
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

fn open(data_dir: &std::path::Path) -> anyhow::Result<SqliteStore> {
    fleetgate_server::Instance::read(data_dir).context("run `fleetgate serve` once first")?;
    Ok(SqliteStore::open(&data_dir.join("fleetgate.db"))?)
}

pub async fn run(cmd: LinkedHubCommand) -> anyhow::Result<()> {
    match cmd {
        LinkedHubCommand::List { data_dir } => {
            let hubs = open(&data_dir)?.hubs().await?;
            let list: Vec<_> = hubs
                .iter()
                .map(|h| {
                    json!({
                        "name": h.host_name,
                        "allocationWeight": h.allocation.allocation_weight,
                        "applyAllocationPolicy": h.allocation.apply_allocation_policy,
                        "latencyMs": h.allocation.latency_ms,
                    })
                })
                .collect();
            print_result(&serde_json::Value::Array(list))?;
        }
        LinkedHubCommand::Create { data_dir, hostname } => {
            let hub = fleetgate_server::datadir::add_hub(&data_dir, &hostname).await?;
            print_result(&serde_json::to_value(hub)?)?;
        }
        LinkedHubCommand::Delete { data_dir, hostname } => {
            fleetgate_server::datadir::remove_hub(&data_dir, &hostname).await?;
            print_result(&json!({ "name": hostname, "deleted": true }))?;
        }
        LinkedHubCommand::Update { data_dir, hostname, allocation_weight, apply_allocation_policy, latency_ms } => {
            let store = open(&data_dir)?;
            let _lock =
                fleetgate_server::datadir::DirLock::for_offline_change(&data_dir, "fleetgate linked-hub update")?;
            let hub = store
                .hubs()
                .await?
                .into_iter()
                .find(|h| h.host_name.eq_ignore_ascii_case(&hostname))
                .ok_or_else(|| anyhow!("no linked hub named '{hostname}'"))?;
            let mut a = hub.allocation.clone();
            if let Some(w) = allocation_weight {
                a.allocation_weight = w;
            }
            if let Some(p) = apply_allocation_policy {
                a.apply_allocation_policy = p;
            }
            if let Some(l) = latency_ms {
                a.latency_ms = l;
            }
            store.set_hub_allocation(&hub.host_name, &a).await?;
            fleetgate_server::datadir::checkpoint_offline_change(&store).await;
            print_result(&json!({
                "name": hub.host_name,
                "allocationWeight": a.allocation_weight,
                "applyAllocationPolicy": a.apply_allocation_policy,
                "latencyMs": a.latency_ms,
            }))?;
        }
    }
    Ok(())
}
