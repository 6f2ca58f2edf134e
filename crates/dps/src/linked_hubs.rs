//! The hubs linked to the instance and their allocation settings: the one place they change.
//! In Azure they belong to the control plane (the `iotHubs` of a provisioning service resource,
//! `az iot dps linked-hub`); here the service API serves them (`/linkedHubs`, needing the
//! `ServiceConfig` right), and `fleetgate linked-hub` calls it. Since every change passes here,
//! the store can keep hubs and policies in memory and drop its copy on each change.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::policy::default_hub_policies;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::{hub_policy_owner, HubRemoval, LinkedHub};
use serde::{Deserialize, Serialize};

use crate::service::store_err;
use crate::Provisioning;

/// Longest host name DNS allows.
const MAX_HOST_NAME: usize = 253;

/// Told after a hub was linked or unlinked or a policy key renewed (committed), before the
/// caller gets its answer: the server rewrites `instance.json`, which lists the hubs with their
/// owner connection strings.
pub trait InstanceChanges: Send + Sync {
    fn instance_changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A linked hub as the API shows it (ARM's `IotHubDefinitionDescription`: `name`,
/// `allocationWeight`, `applyAllocationPolicy`; `latencyMs` is Fleetgate's stand-in for the
/// region distance geoLatency allocation uses).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHubDescription {
    pub name: String,
    pub allocation_weight: u32,
    pub apply_allocation_policy: bool,
    pub latency_ms: u32,
    /// The hub's `iothubowner` connection string: only in the answer to a PUT, which only the
    /// instance's owner may make.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
}

impl LinkedHubDescription {
    fn of(hub: &LinkedHub) -> Self {
        Self {
            name: hub.host_name.clone(),
            allocation_weight: hub.allocation.allocation_weight,
            apply_allocation_policy: hub.allocation.apply_allocation_policy,
            latency_ms: hub.allocation.latency_ms,
            connection_string: None,
        }
    }
}

/// The body of `PUT /linkedHubs/{name}`: the settings to change (absent ones are kept, or the
/// defaults for a new hub). Other fields of ARM's shape (`connectionString`, `location`) are
/// ignored: Fleetgate makes the hub and its keys.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LinkedHubSettings {
    allocation_weight: Option<u32>,
    apply_allocation_policy: Option<bool>,
    latency_ms: Option<u32>,
}

fn check_host_name(name: &str) -> Result<(), AzureError> {
    let bad = name.is_empty()
        || name.len() > MAX_HOST_NAME
        || name.contains(|c: char| c.is_whitespace() || c.is_control() || matches!(c, '/' | ';' | '?' | '#' | '@'));
    if bad {
        return Err(AzureError::new(ErrorCode::InvalidId, format!("'{name}' is not a valid host name.")));
    }
    Ok(())
}

impl Provisioning {
    /// Has `hook` told of every change to the instance's hubs and keys from now on (one hook; a
    /// second is ignored).
    pub fn watch_instance(&self, hook: Arc<dyn InstanceChanges>) {
        if self.instance_changes.set(hook).is_err() {
            tracing::warn!("an instance hook was already set; the new one is ignored");
        }
    }

    pub(crate) async fn instance_changed(&self) {
        if let Some(hook) = self.instance_changes.get() {
            hook.instance_changed().await;
        }
    }

    pub async fn linked_hub_list(&self) -> Result<Vec<LinkedHubDescription>, AzureError> {
        Ok(self.store.hubs().await.map_err(store_err)?.iter().map(LinkedHubDescription::of).collect())
    }

    /// Links hub `name` (with a fresh `iothubowner` key and Azure's default policies) or changes
    /// the settings of the linked hub of that name (case-insensitive); `existing`: only the
    /// latter. Returns the hub and its owner key.
    pub async fn put_linked_hub(
        &self,
        name: &str,
        body: &[u8],
        existing: bool,
    ) -> Result<(LinkedHubDescription, String), AzureError> {
        let name = name.trim();
        check_host_name(name)?;
        let settings: LinkedHubSettings = if body.iter().all(u8::is_ascii_whitespace) {
            LinkedHubSettings::default()
        } else {
            serde_json::from_slice(body)
                .map_err(|e| AzureError::bad_request(format!("The linked hub settings are not valid: {e}")))?
        };
        let hubs = self.store.hubs().await.map_err(store_err)?;
        let (mut hub, created) = match hubs.into_iter().find(|h| h.host_name.eq_ignore_ascii_case(name)) {
            Some(hub) => (hub, false),
            None if existing => {
                return Err(AzureError::new(ErrorCode::NotFound, format!("There is no linked hub named '{name}'.")))
            }
            None => (LinkedHub::new(name, SymmetricKey::generate().to_base64()), true),
        };
        let a = &mut hub.allocation;
        a.allocation_weight = settings.allocation_weight.unwrap_or(a.allocation_weight);
        a.apply_allocation_policy = settings.apply_allocation_policy.unwrap_or(a.apply_allocation_policy);
        a.latency_ms = settings.latency_ms.unwrap_or(a.latency_ms);
        let owner = hub_policy_owner(&hub.host_name);
        if created {
            // Policies first: a hub is never served without its owner policy. (`add_hub` keeps a
            // hub linked meanwhile under the same name, whose key the policies then disagree
            // with; two admins linking one name at once is not worth a transaction.)
            let mut policies = default_hub_policies();
            policies[0].primary_key = hub.owner_key.clone();
            self.store.set_policies(&owner, &policies).await.map_err(store_err)?;
            self.store.add_hub(&hub).await.map_err(store_err)?;
            tracing::info!(hub = %hub.host_name, "hub linked");
            self.instance_changed().await;
        } else if !self.store.set_hub_allocation(&hub.host_name, &hub.allocation).await.map_err(store_err)? {
            return Err(AzureError::new(ErrorCode::NotFound, format!("There is no linked hub named '{name}'.")));
        }
        let policies = self.store.policies(&owner).await.map_err(store_err)?;
        let key = policies
            .iter()
            .find(|p| p.key_name == "iothubowner")
            .map(|p| p.primary_key.clone())
            .unwrap_or_else(|| hub.owner_key.clone());
        Ok((LinkedHubDescription::of(&hub), key))
    }

    /// Unlinks hub `name`: only one without device identities, and never the last.
    pub async fn delete_linked_hub(&self, name: &str) -> Result<(), AzureError> {
        let conflict = |m: String| Err(AzureError::new(ErrorCode::Conflict, m));
        match self.store.remove_hub(name).await.map_err(store_err)? {
            HubRemoval::Removed => {}
            HubRemoval::NoSuchHub => {
                return Err(AzureError::new(ErrorCode::NotFound, format!("There is no linked hub named '{name}'.")))
            }
            HubRemoval::LastHub => {
                return conflict(format!("'{name}' is the instance's only hub; link the one to keep first."))
            }
            HubRemoval::HasDevices(n) => {
                return conflict(format!(
                    "Hub '{name}' has {n} device identities; delete them first and provision the devices again, \
                     so they are assigned another hub."
                ))
            }
        }
        tracing::info!(hub = %name, "hub unlinked");
        self.instance_changed().await;
        Ok(())
    }
}
