//! `fleetgate registration ...`: registration records.

use clap::Subcommand;
use serde_json::Value;

use super::{client, describe, print_json};
use crate::Target;

#[derive(Subcommand)]
pub enum RegistrationCommand {
    /// List the registration records of an enrollment group.
    List {
        #[command(flatten)]
        target: Target,
        /// Enrollment group whose registration records to list.
        #[arg(long)]
        group_id: String,
    },
    /// Show one registration record.
    Show {
        #[command(flatten)]
        target: Target,
        /// Registration id of the record.
        #[arg(long)]
        registration_id: String,
    },
    /// Delete a registration record (the device may then register afresh).
    Delete {
        #[command(flatten)]
        target: Target,
        /// Registration id of the record.
        #[arg(long)]
        registration_id: String,
    },
}

pub async fn run(cmd: RegistrationCommand) -> anyhow::Result<()> {
    match cmd {
        RegistrationCommand::List { target, group_id } => {
            print_json(&Value::Array(client(&target)?.list_registrations(&group_id).await.map_err(describe)?));
        }
        RegistrationCommand::Show { target, registration_id } => {
            print_json(&client(&target)?.get_registration(&registration_id).await.map_err(describe)?);
        }
        RegistrationCommand::Delete { target, registration_id } => {
            client(&target)?.delete_registration(&registration_id).await.map_err(describe)?;
        }
    }
    Ok(())
}
