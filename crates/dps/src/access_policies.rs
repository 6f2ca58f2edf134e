//! The shared access policies of the instance and of each linked hub: listed and their keys
//! renewed through the service API (`/policies`, needing `ServiceConfig`; Azure's
//! `az iot dps policy` / `az iot hub policy`), the one path that changes them, so the store's
//! in-memory copy is dropped on each change and a renewed key is in force at once.

use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::policy::AccessPolicy;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::hub_policy_owner;

use crate::management::POLICY_OWNER;
use crate::service::store_err;
use crate::Provisioning;

/// Which of a policy's keys to renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Primary,
    Secondary,
}

impl Provisioning {
    /// Where the policies of the instance (`hub: None`) or of a linked hub are kept; a hub that
    /// is not linked is 404.
    async fn policy_owner(&self, hub: Option<&str>) -> Result<String, AzureError> {
        let Some(hub) = hub else { return Ok(POLICY_OWNER.to_owned()) };
        let hubs = self.store.hubs().await.map_err(store_err)?;
        let linked = hubs.iter().find(|h| h.host_name.eq_ignore_ascii_case(hub));
        let linked = linked
            .ok_or_else(|| AzureError::new(ErrorCode::NotFound, format!("There is no linked hub named '{hub}'.")))?;
        Ok(hub_policy_owner(&linked.host_name))
    }

    /// The policies of the instance (`hub: None`) or of a linked hub, keys included.
    pub async fn policy_list(&self, hub: Option<&str>) -> Result<Vec<AccessPolicy>, AzureError> {
        let owner = self.policy_owner(hub).await?;
        self.store.policies(&owner).await.map_err(store_err)
    }

    /// Replaces one key of a policy with a fresh one. Tokens signed with the old key stop
    /// working at once.
    pub async fn renew_policy_key(
        &self,
        hub: Option<&str>,
        name: &str,
        which: KeyKind,
    ) -> Result<AccessPolicy, AzureError> {
        let owner = self.policy_owner(hub).await?;
        let mut policies = self.store.policies(&owner).await.map_err(store_err)?;
        let policy = policies
            .iter_mut()
            .find(|p| p.key_name.eq_ignore_ascii_case(name))
            .ok_or_else(|| AzureError::new(ErrorCode::NotFound, format!("There is no policy named '{name}'.")))?;
        let fresh = SymmetricKey::generate().to_base64();
        match which {
            KeyKind::Primary => policy.primary_key = fresh,
            KeyKind::Secondary => policy.secondary_key = fresh,
        }
        let renewed = policy.clone();
        self.store.set_policies(&owner, &policies).await.map_err(store_err)?;
        tracing::info!(policy = %renewed.key_name, ?which, "policy key renewed");
        self.instance_changed().await;
        Ok(renewed)
    }
}
