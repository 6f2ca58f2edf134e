//! `fleetgate events`: maintenance of the telemetry log in the data directory.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Subcommand)]
pub enum EventsCommand {
    /// Copy the intact records of damaged telemetry segments into clean ones, keeping each
    /// damaged original beside it as `….events.damaged`. Offline: refuses while the server runs.
    Repair {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
    },
    /// Read every record of every telemetry segment and report damage, changing nothing (also
    /// while the server runs). Exits non-zero when damage is found.
    Verify {
        /// Data directory of the local instance.
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
        data_dir: PathBuf,
    },
}

pub fn run(cmd: EventsCommand) -> anyhow::Result<()> {
    match cmd {
        EventsCommand::Repair { data_dir } => {
            let dir = data_dir.join("events");
            let report = fleetgate_store::event_log::repair(&dir)
                .with_context(|| format!("repairing the event log in {}", dir.display()))?;
            out!("{report}");
            Ok(())
        }
        EventsCommand::Verify { data_dir } => {
            let dir = data_dir.join("events");
            let report = fleetgate_store::event_log::verify(&dir)
                .with_context(|| format!("verifying the event log in {}", dir.display()))?;
            out!("{report}");
            anyhow::ensure!(report.is_clean(), "the event log in {} is damaged", dir.display());
            Ok(())
        }
    }
}
