//! Device twins: the device's reported properties, the service's tags and desired properties,
//! and desired-property notifications to a listening device.

use std::sync::atomic::Ordering;

use base64::Engine;
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::etag::check_if_match;
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::{parse_patch, Twin};
use fleetgate_core::AzureError;
use serde_json::{Map, Value};

use crate::authentication::HubDevice;
use crate::errors::{not_found, store_err};
use crate::sessions::{DesiredPatch, Outbound};
use crate::Hub;

/// A service's change to a twin: JSON merge patches of its tags and of its desired properties
/// (either may be absent). Reported properties are the device's alone.
#[derive(Debug, Clone, Default)]
pub struct TwinChange {
    pub tags: Option<Map<String, Value>>,
    pub desired: Option<Map<String, Value>>,
}

/// A service's replacement of a twin (Azure's replace twin, `PUT /twins/{id}`): the whole tags
/// and desired properties; what is not in them is removed.
#[derive(Debug, Clone, Default)]
pub struct TwinReplacement {
    pub tags: Map<String, Value>,
    pub desired: Map<String, Value>,
}

/// The twin's etag changes with every version.
pub fn twin_etag(twin: &Twin) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\"{}\"", twin.version))
}

impl Hub {
    /// A device's identity and twin; a twin stored before twins had metadata is dated as of
    /// the device's creation.
    pub async fn twin(&self, hub: &str, device_id: &str) -> Result<(DeviceIdentity, Twin), AzureError> {
        let (dev, mut twin) =
            self.store.twin(hub, device_id).await.map_err(store_err)?.ok_or_else(|| not_found(device_id))?;
        twin.date_undated(&dev.created_date_time_utc);
        Ok((dev, twin))
    }

    /// A device's reported-properties patch; returns the new reported version.
    pub async fn patch_reported(&self, d: &HubDevice, body: &[u8]) -> Result<u64, AzureError> {
        let patch = parse_patch(body)?;
        let id = d.device_id.clone();
        let updated = self
            .store
            .update_device(
                &d.hub,
                &d.device_id,
                Box::new(move |cur| {
                    let (dev, mut twin) = cur.ok_or_else(|| not_found(&id))?;
                    twin.date_undated(&dev.created_date_time_utc);
                    twin.patch_reported(&patch, Timestamp::now())?;
                    Ok(Some((dev, twin)))
                }),
            )
            .await
            .map_err(store_err)?;
        d.touch(Timestamp::now());
        Ok(updated.map(|(_, t)| t.reported_version).unwrap_or_default())
    }

    /// A service's twin change (`tags` and/or `properties.desired`), etag-checked; the device is
    /// told about desired changes if it listens.
    pub async fn patch_twin(
        &self,
        hub: &str,
        device_id: &str,
        change: TwinChange,
        if_match: Option<String>,
    ) -> Result<(DeviceIdentity, Twin), AzureError> {
        let TwinChange { tags, desired } = change;
        let desired_for_store = desired.clone();
        let (dev, twin, ()) = self
            .change_service_twin(hub, device_id, if_match, move |twin| {
                if let Some(t) = &tags {
                    twin.patch_tags(t)?;
                }
                if let Some(d) = &desired_for_store {
                    twin.patch_desired(d, Timestamp::now())?;
                }
                Ok(())
            })
            .await?;
        if let Some(patch) = desired {
            self.notify_desired(hub, device_id, &patch, twin.desired_version);
        }
        Ok((dev, twin))
    }

    /// A service's replacement of the tags and desired properties, etag-checked (Azure's replace
    /// twin). A listening device hears the merge patch from its last desired properties to the
    /// new ones (removed members as `null`), so a device that merges patches ends up with
    /// exactly the replacement.
    pub async fn replace_twin(
        &self,
        hub: &str,
        device_id: &str,
        replacement: TwinReplacement,
        if_match: Option<String>,
    ) -> Result<(DeviceIdentity, Twin), AzureError> {
        let (dev, twin, patch) = self
            .change_service_twin(hub, device_id, if_match, move |twin| {
                Ok(twin.replace(replacement.tags, replacement.desired, Timestamp::now())?.0)
            })
            .await?;
        self.notify_desired(hub, device_id, &patch, twin.desired_version);
        Ok((dev, twin))
    }

    /// What every service-side twin change shares: the device must exist, `If-Match` must match
    /// the twin's etag, twins stored before `$metadata` are dated first; `edit` runs in the
    /// store's transaction and what it returns is handed back with the committed twin.
    async fn change_service_twin<T: Send + 'static>(
        &self,
        hub: &str,
        device_id: &str,
        if_match: Option<String>,
        edit: impl FnOnce(&mut Twin) -> Result<T, AzureError> + Send + 'static,
    ) -> Result<(DeviceIdentity, Twin, T), AzureError> {
        let id = device_id.to_owned();
        let edited = std::sync::Arc::new(std::sync::Mutex::new(None));
        let edited_in_store = edited.clone();
        let (dev, twin) = self
            .store
            .update_device(
                hub,
                device_id,
                Box::new(move |cur| {
                    let (dev, mut twin) = cur.ok_or_else(|| not_found(&id))?;
                    check_if_match(if_match.as_deref(), Some(&twin_etag(&twin)))?;
                    twin.date_undated(&dev.created_date_time_utc);
                    let out = edit(&mut twin)?;
                    *edited_in_store.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
                    Ok(Some((dev, twin)))
                }),
            )
            .await
            .map_err(store_err)?
            .ok_or_else(|| not_found(device_id))?;
        let out = edited.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or_else(AzureError::internal)?;
        Ok((dev, twin, out))
    }

    /// Tells the device, if it listens, about a change to its desired properties.
    fn notify_desired(&self, hub: &str, device_id: &str, patch: &Map<String, Value>, version: u64) {
        if let Some(live) = self.sessions.get(hub, device_id) {
            if live.flags.desired.load(Ordering::Relaxed) {
                let body = Twin::desired_notification(patch, version);
                // A device too slow to take it re-reads the twin on reconnect (the SDKs do).
                let _ = live.tx.try_send(Outbound::DesiredPatch(Box::new(DesiredPatch { body, version })));
            }
        }
    }
}
