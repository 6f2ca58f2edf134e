//! `fleetgate audit`: the audit trail of the local instance (attestation attempts, hub
//! connections, service-side changes), newest last, one JSON object per entry.

use std::path::PathBuf;

use anyhow::Context;
use fleetgate_core::audit::{AuditQuery, Outcome};
use fleetgate_store::{SqliteStore, Store};

#[derive(clap::Args)]
pub struct AuditArgs {
    #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "./fleetgate-data")]
    data_dir: PathBuf,
    /// Entries at or after this UTC time, e.g. 2026-11-28 or 2026-11-28T14:00:00Z.
    #[arg(long)]
    since: Option<String>,
    /// Entries about this registration id (or device id, group id, policy).
    #[arg(long, visible_alias = "device-id")]
    registration_id: Option<String>,
    #[arg(long, value_parser = ["success", "failure"])]
    outcome: Option<String>,
    /// At most this many entries.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    fleetgate_server::Instance::read(&args.data_dir).context("run `fleetgate serve` once first")?;
    let store = SqliteStore::open(&args.data_dir.join("fleetgate.db"))?;
    let query = AuditQuery {
        since: args.since,
        id: args.registration_id,
        outcome: args.outcome.map(|o| if o == "success" { Outcome::Success } else { Outcome::Failure }),
        limit: args.limit,
    };
    for e in store.audit(&query).await? {
        outln!("{}", serde_json::to_string(&e)?);
    }
    Ok(())
}
