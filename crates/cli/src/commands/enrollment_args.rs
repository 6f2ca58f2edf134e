//! The options enrollment groups and individual enrollments share, as `az iot dps` spells them.

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Clone, Default)]
pub struct EnrollmentArgs {
    /// Primary symmetric key (base64); generated when creating without one.
    #[arg(long, visible_alias = "pk")]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (base64); generated when creating without one.
    #[arg(long, visible_alias = "sk")]
    pub secondary_key: Option<String>,
    /// X.509 attestation: PEM (or base64 DER) file of the primary certificate — a group's root
    /// or intermediate CA, an individual enrollment's device certificate (the first one in the file).
    #[arg(long, visible_alias = "cp", conflicts_with_all = ["primary_key", "secondary_key"])]
    pub certificate_path: Option<std::path::PathBuf>,
    /// X.509 attestation: the secondary certificate.
    #[arg(long, visible_alias = "scp", conflicts_with_all = ["primary_key", "secondary_key"])]
    pub secondary_certificate_path: Option<std::path::PathBuf>,
    /// Hub to assign devices to (static allocation).
    #[arg(long = "iot-hub", visible_aliases = ["iot-hub-host-name", "hn"])]
    pub iot_hub_host_name: Option<String>,
    /// Hubs this enrollment may use (comma-separated); default: every linked hub.
    #[arg(long, visible_alias = "ih", value_delimiter = ',')]
    pub iot_hubs: Vec<String>,
    /// hashed (evenly weighted), geolatency, static or custom.
    #[arg(long, visible_alias = "ap", value_parser = ["hashed", "geolatency", "static", "custom"])]
    pub allocation_policy: Option<String>,
    /// Custom allocation webhook URL (with --allocation-policy custom).
    #[arg(long, visible_alias = "wh")]
    pub webhook_url: Option<String>,
    /// Custom allocation API version.
    #[arg(long, visible_alias = "av", default_value = "2021-10-01")]
    pub api_version: String,
    /// Initial twin JSON, inline or `@file.json`: {"tags":{...},"properties":{"desired":{...}}}.
    #[arg(long, value_parser = crate::at_file::json)]
    pub initial_twin: Option<Value>,
    /// Whether devices may register (enabled) or are refused (disabled).
    #[arg(long, visible_alias = "ps", value_parser = ["enabled", "disabled"])]
    pub provisioning_status: Option<String>,
    /// reprovisionandmigratedata, reprovisionandresetdata or never.
    #[arg(long, visible_alias = "rp", value_parser = ["reprovisionandmigratedata", "reprovisionandresetdata", "never"])]
    pub reprovision_policy: Option<String>,
}

impl EnrollmentArgs {
    /// Writes the options given into an enrollment's JSON (creating or updating it).
    pub fn apply(&self, e: &mut Value) -> anyhow::Result<()> {
        self.apply_certificates(e)?;
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
            e["initialTwin"] = t.clone();
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

    /// `--certificate-path` / `--secondary-certificate-path`: X.509 attestation. A group (its
    /// JSON has `enrollmentGroupId`) trusts them as CA certificates (`signingCertificates`), an
    /// individual enrollment pins them (`clientCertificates`). A slot not given keeps its
    /// certificate when updating.
    fn apply_certificates(&self, e: &mut Value) -> anyhow::Result<()> {
        if self.certificate_path.is_none() && self.secondary_certificate_path.is_none() {
            return Ok(());
        }
        let field = if e.get("enrollmentGroupId").is_some() { "signingCertificates" } else { "clientCertificates" };
        if e["attestation"]["type"] != "x509" || e["attestation"]["x509"].get(field).is_none() {
            e["attestation"] = json!({"type": "x509", "x509": {field: {}}});
        }
        for (slot, path) in [("primary", &self.certificate_path), ("secondary", &self.secondary_certificate_path)] {
            if let Some(path) = path {
                let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                e["attestation"]["x509"][field][slot] = json!({ "certificate": pem });
            }
        }
        if e["attestation"]["x509"][field].get("primary").is_none() {
            bail!("X.509 attestation needs --certificate-path (the primary certificate)");
        }
        Ok(())
    }
}
