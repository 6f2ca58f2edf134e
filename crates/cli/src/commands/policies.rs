//! `fleetgate policy ...`: shared access policies of the instance and its hubs
//! (`az iot dps policy` / `az iot hub policy`). Control-plane data, so these verbs work on the
//! data directory; a running server uses a renewed key at once.

use std::path::PathBuf;

use clap::Subcommand;
use fleetgate_server::datadir::{list_policies, renew_policy_key, KeyKind};
use serde_json::json;

use super::print_result;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// List the policies and their rights (keys with --show-keys).
    List {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
        /// A hub's policies instead of the DPS instance's.
        #[arg(long)]
        hub: Option<String>,
        /// Include the policies' keys in the output.
        #[arg(long)]
        show_keys: bool,
    },
    /// Replace a policy's primary or secondary key; tokens signed with the old key stop working.
    RenewKey {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
        /// Renew a policy of this hub instead of one of the DPS instance.
        #[arg(long)]
        hub: Option<String>,
        /// Name of the policy whose key to replace.
        #[arg(long)]
        name: String,
        /// Which of the policy's keys to replace.
        #[arg(long, default_value = "primary", value_parser = ["primary", "secondary"])]
        key: String,
    },
}

pub async fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::List { data_dir, hub, show_keys } => {
            let policies = list_policies(&data_dir, hub.as_deref()).await?;
            let out: Vec<_> = policies
                .iter()
                .map(|p| {
                    let mut v = json!({"keyName": p.key_name, "rights": p.rights});
                    if show_keys {
                        v["primaryKey"] = p.primary_key.clone().into();
                        v["secondaryKey"] = p.secondary_key.clone().into();
                    }
                    v
                })
                .collect();
            print_result(&serde_json::Value::Array(out))?;
        }
        PolicyCommand::RenewKey { data_dir, hub, name, key } => {
            let which = if key == "secondary" { KeyKind::Secondary } else { KeyKind::Primary };
            let p = renew_policy_key(&data_dir, hub.as_deref(), &name, which).await?;
            print_result(
                &json!({"keyName": p.key_name, "rights": p.rights, "primaryKey": p.primary_key, "secondaryKey": p.secondary_key}),
            )?;
        }
    }
    Ok(())
}
