//! `fleetgate registration ...`: registration records (`az iot dps enrollment-group
//! registration`).

use clap::Subcommand;
use serde_json::Value;

use super::{client, describe, print_result};
use crate::Target;

#[derive(Subcommand)]
pub enum RegistrationCommand {
    /// List the registration records of an enrollment group.
    List {
        #[command(flatten)]
        target: Target,
        /// Enrollment group whose registration records to list.
        #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"])]
        group_id: String,
    },
    /// Show one registration record.
    Show {
        #[command(flatten)]
        target: Target,
        /// Registration id of the record.
        #[arg(long, visible_alias = "rid")]
        registration_id: String,
    },
    /// Delete registration records (the devices may then register afresh): the ones named, or
    /// every one of a group with `--group-id G --all --yes`. With more than one, prints a result
    /// per record and goes on past a failure (exit status 1 then).
    Delete {
        #[command(flatten)]
        target: Target,
        /// Registration id(s) of the record(s) to delete (space-separated).
        #[arg(long, visible_alias = "rid", num_args = 1.., required_unless_present = "all", conflicts_with = "all")]
        registration_id: Vec<String>,
        /// Delete every registration record of the enrollment group --group-id (needs --yes).
        #[arg(long, requires = "group_id")]
        all: bool,
        /// The enrollment group whose records --all deletes.
        #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"], requires = "all")]
        group_id: Option<String>,
        /// Confirm deleting every registration record of the group (with --all).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

pub async fn run(cmd: RegistrationCommand) -> anyhow::Result<()> {
    match cmd {
        RegistrationCommand::List { target, group_id } => {
            print_result(&Value::Array(client(&target)?.list_registrations(&group_id).await.map_err(describe)?))?;
        }
        RegistrationCommand::Show { target, registration_id } => {
            print_result(&client(&target)?.get_registration(&registration_id).await.map_err(describe)?)?;
        }
        RegistrationCommand::Delete { target, registration_id, all, group_id, yes } => {
            let c = client(&target)?;
            if let [one] = registration_id.as_slice() {
                return c.delete_registration(one).await.map_err(describe);
            }
            let ids = match group_id.filter(|_| all) {
                Some(group) => {
                    let records = c.list_registrations(&group).await.map_err(describe)?;
                    let ids: Vec<String> =
                        records.iter().filter_map(|r| r["registrationId"].as_str().map(str::to_owned)).collect();
                    super::bulk::confirm(yes, ids.len(), &format!("registration records of '{group}'"))?;
                    ids
                }
                None => registration_id,
            };
            let mut results = Vec::new();
            for id in ids {
                results.push((id.clone(), c.delete_registration(&id).await.map_err(describe)));
            }
            super::bulk::report("registrationId", results)?;
        }
    }
    Ok(())
}
