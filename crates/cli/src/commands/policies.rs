//! `fleetgate policy ...`: shared access policies of the instance and its hubs
//! (`az iot dps policy` / `az iot hub policy`), through the running server's service API
//! (`/policies`, the owner policy's `ServiceConfig` right); a renewed key is in force at once.

use clap::Subcommand;
use serde_json::{json, Value};

use super::{client, describe, print_result};
use crate::Target;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// List the policies and their rights (keys with --show-keys).
    List {
        #[command(flatten)]
        target: Target,
        /// A hub's policies instead of the DPS instance's.
        #[arg(long)]
        hub: Option<String>,
        /// Include the policies' keys in the output.
        #[arg(long)]
        show_keys: bool,
    },
    /// Replace a policy's primary or secondary key; tokens signed with the old key stop working.
    RenewKey {
        #[command(flatten)]
        target: Target,
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
        PolicyCommand::List { target, hub, show_keys } => {
            let policies = client(&target)?.list_policies(hub.as_deref()).await.map_err(describe)?;
            let out: Vec<_> = policies
                .iter()
                .map(|p| {
                    let mut v = json!({"keyName": p["keyName"], "rights": p["rights"]});
                    if show_keys {
                        v["primaryKey"] = p["primaryKey"].clone();
                        v["secondaryKey"] = p["secondaryKey"].clone();
                    }
                    v
                })
                .collect();
            print_result(&Value::Array(out))?;
        }
        PolicyCommand::RenewKey { target, hub, name, key } => {
            let c = client(&target)?;
            let p = c.renew_policy_key(hub.as_deref(), &name, key == "secondary").await.map_err(describe)?;
            print_result(
                &json!({"keyName": p["keyName"], "rights": p["rights"], "primaryKey": p["primaryKey"], "secondaryKey": p["secondaryKey"]}),
            )?;
        }
    }
    Ok(())
}
