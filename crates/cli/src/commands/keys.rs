//! `fleetgate compute-device-key`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use fleetgate_core::keys::compute_device_key;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("ids").required(true))]
pub struct ComputeArgs {
    /// The enrollment group's (base64) key.
    #[arg(long, visible_alias = "symmetric-key")]
    key: String,
    /// The device's registration id; prints the derived key as a JSON string.
    #[arg(long, visible_alias = "rid", group = "ids")]
    registration_id: Option<String>,
    /// A file of registration ids, one per line; prints CSV `registrationId,derivedKey`.
    #[arg(long, group = "ids")]
    registration_ids_file: Option<PathBuf>,
}

pub fn run(args: ComputeArgs) -> anyhow::Result<()> {
    let derive = |id: &str| compute_device_key(&args.key, id).map_err(|e| anyhow!("{}", e.message));
    if let Some(id) = &args.registration_id {
        return crate::output::print_result(&serde_json::Value::String(derive(id)?));
    }
    let path = args.registration_ids_file.as_ref().expect("clap requires one of the two");
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = String::from("registrationId,derivedKey\n");
    for (n, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() {
            continue;
        }
        if let Err(e) = fleetgate_core::ids::RegistrationId::parse(id) {
            bail!("{}:{}: {}", path.display(), n + 1, e.message);
        }
        out.push_str(&format!("{id},{}\n", derive(id)?));
    }
    out!("{out}");
    Ok(())
}
