//! The device registry as the service side changes it: identities created, replaced and
//! deleted (each change ending connections its credentials no longer cover), listed and counted,
//! and what the hub knows of each device live.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fleetgate_core::device::{DeviceCredentials, DeviceIdentity, DeviceStatus};
use fleetgate_core::etag::check_if_match;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::Twin;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::DeviceCounts;

use crate::errors::{not_found, store_err};
use crate::Hub;

/// What a service asks a device identity to be (`PUT /devices/{id}`). Not `Debug`: it holds keys.
#[derive(Clone)]
pub struct DeviceSpec {
    pub status: DeviceStatus,
    /// Azure's `statusReason`, stored and returned as given.
    pub status_reason: Option<String>,
    /// SAS keys (primary, secondary): a key left out is kept from the identity replaced, or
    /// generated for a new one. Ignored for X.509 identities.
    pub keys: [Option<SymmetricKey>; 2],
    /// X.509 credentials, or [`DeviceCredentials::None`]; `None` for a SAS identity.
    pub credentials: Option<DeviceCredentials>,
}

/// What the hub knows of a device beyond its identity: its connection, now.
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub connected: bool,
    /// When it connected or disconnected last (Azure's time format); `None` when it has not
    /// since the server started.
    pub state_updated: Option<String>,
    pub last_activity: Option<Timestamp>,
    /// Unexpired cloud-to-device messages waiting for it.
    pub c2d_queued: u64,
}

impl Hub {
    /// Creates or replaces a device identity (service API `PUT /devices/{id}`).
    pub async fn put_device(
        &self,
        hub: &str,
        device_id: &str,
        spec: DeviceSpec,
        if_match: Option<String>,
    ) -> Result<DeviceIdentity, AzureError> {
        // IoT Hub's rule, wider than DPS's registration ids (a device DPS creates has its
        // registration id, which always passes).
        fleetgate_core::ids::check_device_id(device_id)?;
        let DeviceSpec { status, status_reason, keys, credentials: x509 } = spec;
        let (hub_s, id) = (hub.to_owned(), device_id.to_owned());
        let now = Timestamp::now();
        // Decided in the store's transaction, from the identity it replaces.
        let credentials_changed = Arc::new(AtomicBool::new(false));
        let changed = credentials_changed.clone();
        let result = self
            .store
            .update_device(
                hub,
                device_id,
                Box::new(move |cur| {
                    let existing = cur.as_ref().map(|(d, _)| d);
                    match (if_match.as_deref().map(str::trim), existing) {
                        // Azure: PUT without If-Match creates only.
                        (None, Some(_)) => {
                            return Err(AzureError::new(
                                ErrorCode::DeviceAlreadyExists,
                                "A device with this id already exists.",
                            ))
                        }
                        // `*` (or an empty header) creates or replaces.
                        (None | Some("" | "*"), None) => {}
                        (m, existing) => check_if_match(m, existing.map(|d| d.etag.as_str()))?,
                    }
                    let credentials = match &x509 {
                        // An update of a certificateAuthority identity keeps the CAs it was provisioned with.
                        Some(DeviceCredentials::CertificateAuthority(_)) => DeviceCredentials::CertificateAuthority(
                            existing.map(|d| d.ca_certificates.clone()).unwrap_or_default(),
                        ),
                        Some(c) => c.clone(),
                        None => {
                            let stored = [existing.map(|d| &d.primary_key), existing.map(|d| &d.secondary_key)];
                            DeviceCredentials::Keys(
                                keys.iter()
                                    .zip(stored)
                                    .map(|(given, stored)| {
                                        given
                                            .clone()
                                            .or_else(|| stored.and_then(|k| SymmetricKey::from_base64(k).ok()))
                                            .filter(|k| !k.as_bytes().is_empty())
                                            .unwrap_or_else(SymmetricKey::generate)
                                    })
                                    .collect(),
                            )
                        }
                    };
                    let mut dev = DeviceIdentity::provisioned_with(existing, &hub_s, &id, credentials, now);
                    dev.status = status;
                    dev.status_reason = status_reason;
                    changed.store(existing.is_some_and(|old| !old.same_credentials(&dev)), Ordering::Relaxed);
                    let twin = cur.map(|(_, t)| t).unwrap_or_else(|| {
                        let mut twin = Twin::default();
                        twin.date_undated(&now.to_azure_string());
                        twin
                    });
                    Ok(Some((dev, twin)))
                }),
            )
            .await
            .map_err(store_err)?;
        let (dev, _) = result.ok_or_else(AzureError::internal)?;
        // A disabled device, or one whose keys, thumbprints or CAs changed, keeps no connection
        // opened before: the old credentials may be the reason for the change.
        let changed = credentials_changed.load(Ordering::Relaxed);
        if dev.status == DeviceStatus::Disabled || changed {
            if changed {
                tracing::info!(hub = %hub, device = %dev.device_id, "device credentials changed; closing its connection");
            }
            self.sessions.close(hub, device_id);
        }
        Ok(dev)
    }

    pub async fn delete_device(&self, hub: &str, device_id: &str, if_match: Option<String>) -> Result<(), AzureError> {
        let id = device_id.to_owned();
        self.store
            .update_device(
                hub,
                device_id,
                Box::new(move |cur| {
                    let (dev, _) = cur.ok_or_else(|| not_found(&id))?;
                    check_if_match(if_match.as_deref(), Some(&dev.etag))?;
                    Ok(None)
                }),
            )
            .await
            .map_err(store_err)?;
        self.sessions.close(hub, device_id);
        Ok(())
    }

    pub async fn devices(&self, hub: &str, offset: usize, limit: usize) -> Result<Vec<DeviceIdentity>, AzureError> {
        self.store.devices(hub, offset, limit).await.map_err(store_err)
    }

    /// Identities with their twins, in creation order (the hub query reads these).
    pub async fn twins(
        &self,
        hub: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<(DeviceIdentity, Twin)>, AzureError> {
        let mut twins = self.store.twins(hub, offset, limit).await.map_err(store_err)?;
        for (dev, twin) in &mut twins {
            twin.date_undated(&dev.created_date_time_utc);
        }
        Ok(twins)
    }

    /// Counted by the store (Azure's `RegistryStatistics`).
    pub async fn registry_statistics(&self, hub: &str) -> Result<DeviceCounts, AzureError> {
        self.store.device_counts(hub).await.map_err(store_err)
    }

    /// How many devices of `hub` are connected now (Azure's `ServiceStatistics`).
    pub fn connected_devices(&self, hub: &str) -> usize {
        self.sessions.count_of(hub)
    }

    /// What the hub knows of the device now: its connection (in memory) and its C2D queue (in
    /// the store).
    pub async fn device_state(&self, dev: &DeviceIdentity) -> Result<DeviceState, AzureError> {
        let (connected, state_updated) = self.sessions.connection_state(&dev.hub, &dev.device_id);
        let now = Timestamp::now().unix_seconds();
        let c2d_queued = self.store.c2d_count(&dev.hub, &dev.device_id, now).await.map_err(store_err)?;
        Ok(DeviceState {
            connected,
            state_updated,
            last_activity: self.last_activity(&dev.hub, &dev.device_id),
            c2d_queued,
        })
    }
}
