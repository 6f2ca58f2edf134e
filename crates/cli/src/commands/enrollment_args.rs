//! The options enrollment groups and individual enrollments share, as `az iot dps` spells them.

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Clone, Default)]
pub struct EnrollmentArgs {
    /// Primary symmetric key (base64); generated when creating without one.
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (base64); generated when creating without one.
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// Hub to assign devices to (static allocation).
    #[arg(long = "iot-hub", visible_alias = "iot-hub-host-name")]
    pub iot_hub_host_name: Option<String>,
    /// Hubs this enrollment may use (comma-separated); default: every linked hub.
    #[arg(long, value_delimiter = ',')]
    pub iot_hubs: Vec<String>,
    /// hashed (evenly weighted), geolatency, static or custom.
    #[arg(long, value_parser = ["hashed", "geolatency", "static", "custom"])]
    pub allocation_policy: Option<String>,
    /// Custom allocation webhook URL (with --allocation-policy custom).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Custom allocation API version.
    #[arg(long, default_value = "2021-10-01")]
    pub api_version: String,
    /// Initial twin JSON: {"tags":{...},"properties":{"desired":{...}}}.
    #[arg(long)]
    pub initial_twin: Option<String>,
    #[arg(long, value_parser = ["enabled", "disabled"])]
    pub provisioning_status: Option<String>,
    /// reprovisionandmigratedata, reprovisionandresetdata or never.
    #[arg(long, value_parser = ["reprovisionandmigratedata", "reprovisionandresetdata", "never"])]
    pub reprovision_policy: Option<String>,
}

impl EnrollmentArgs {
    /// Writes the options given into an enrollment's JSON (creating or updating it).
    pub fn apply(&self, e: &mut Value) -> anyhow::Result<()> {
        if e.get("attestation").is_none() {
            e["attestation"] = json!({"type": "symmetricKey", "symmetricKey": {}});
        }
        if let Some(k) = &self.primary_key {
            e["attestation"]["symmetricKey"]["primaryKey"] = k.clone().into();
        }
        if let Some(k) = &self.secondary_key {
            e["attestation"]["symmetricKey"]["secondaryKey"] = k.clone().into();
        }
        if let Some(h) = &self.iot_hub_host_name {
            e["iotHubHostName"] = h.clone().into();
            if self.allocation_policy.is_none() {
                e["allocationPolicy"] = "static".into();
            }
        }
        if !self.iot_hubs.is_empty() {
            e["iotHubs"] = json!(self.iot_hubs);
        }
        if let Some(p) = &self.allocation_policy {
            e["allocationPolicy"] = if p == "geolatency" { "geoLatency".into() } else { p.clone().into() };
        }
        if let Some(url) = &self.webhook_url {
            e["customAllocationDefinition"] = json!({"webhookUrl": url, "apiVersion": self.api_version});
        }
        if self.allocation_policy.as_deref() == Some("custom") && e.get("customAllocationDefinition").is_none() {
            bail!("--allocation-policy custom needs --webhook-url");
        }
        if let Some(t) = &self.initial_twin {
            e["initialTwin"] = serde_json::from_str(t).context("--initial-twin is not valid JSON")?;
        }
        if let Some(s) = &self.provisioning_status {
            e["provisioningStatus"] = s.clone().into();
        }
        if let Some(p) = &self.reprovision_policy {
            let (update, migrate) = match p.as_str() {
                "reprovisionandmigratedata" => (true, true),
                "reprovisionandresetdata" => (true, false),
                _ => (false, false),
            };
            e["reprovisionPolicy"] = json!({"updateHubAssignment": update, "migrateDeviceData": migrate});
        }
        Ok(())
    }
}
