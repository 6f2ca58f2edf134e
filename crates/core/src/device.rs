//! Device identities in a hub's registry, as created when DPS assigns a device.

use serde::{Deserialize, Serialize};

use crate::keys::SymmetricKey;
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum DeviceStatus {
    #[default]
    Enabled,
    Disabled,
}

/// A hub device identity. Keys are the derived device keys; `Debug` never shows them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    pub hub: String,
    pub device_id: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub status: DeviceStatus,
    pub etag: String,
    pub generation_id: String,
    pub created_date_time_utc: String,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("hub", &self.hub)
            .field("device_id", &self.device_id)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// The identity DPS creates at assignment, or the existing one refreshed with the current
    /// derived keys (a group key roll must reach the hub). Status and generation are kept.
    pub fn provisioned(
        existing: Option<&DeviceIdentity>,
        hub: &str,
        device_id: &str,
        keys: &[SymmetricKey],
        now: Timestamp,
    ) -> Self {
        let key = |i: usize| keys.get(i).or(keys.first()).map(SymmetricKey::to_base64).unwrap_or_default();
        DeviceIdentity {
            hub: hub.to_owned(),
            device_id: existing.map(|d| d.device_id.clone()).unwrap_or_else(|| device_id.to_owned()),
            primary_key: key(0),
            secondary_key: key(1),
            status: existing.map(|d| d.status).unwrap_or_default(),
            etag: crate::registration::new_registration_etag(),
            generation_id: existing
                .map(|d| d.generation_id.clone())
                .unwrap_or_else(|| format!("{}", 638_000_000_000_000_000u64 + rand::random::<u32>() as u64)),
            created_date_time_utc: existing
                .map(|d| d.created_date_time_utc.clone())
                .unwrap_or_else(|| now.to_azure_string()),
        }
    }
}
