//! [`Provisioning`]: the DPS instance's state and configuration. The decisions live beside it:
//! `registration.rs` (what devices ask) and `management.rs` (what the service API asks).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fleetgate_core::attestation::KeySlot;
use fleetgate_core::enrollment::EnrollmentGroup;
use fleetgate_core::ids::{IdScope, RegistrationId};
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::throttle::{Rate, TokenBucket};
use fleetgate_core::time::Timestamp;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::{AuditLog, Store, StoreError};

use fleetgate_store::cache::Cached;

/// What the provisioning service needs to know about its instance.
#[derive(Clone, Debug)]
pub struct ProvisioningConfig {
    pub id_scope: IdScope,
    /// Host names the service API answers to (a token's `sr` must name one of them).
    pub service_host_names: Vec<String>,
    /// Answer a register request with the final 200 straight away (all SDKs accept it) rather
    /// than 202 + operation-status polling.
    pub immediate_assignment: bool,
    /// How long a custom allocation webhook may take before the registration fails.
    pub webhook_timeout: Duration,
    /// Registrations admitted per ID scope (Azure: 1,000 a minute per unit); `None` = no limit.
    pub registration_rate: Option<Rate>,
}

impl ProvisioningConfig {
    pub fn new(id_scope: IdScope) -> Self {
        Self {
            id_scope,
            service_host_names: vec!["localhost".into()],
            immediate_assignment: true,
            webhook_timeout: Duration::from_secs(10),
            registration_rate: None,
        }
    }
}

/// Which enrollment a device attested through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentRef {
    Group(String),
    Individual,
}

/// A device that proved it holds an enrollment's key (or one derived from a group's), or a
/// certificate the enrollment trusts.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    pub registration_id: RegistrationId,
    pub enrollment: EnrollmentRef,
    /// Which key, or which certificate (pinned or CA), matched.
    pub key_slot: KeySlot,
    /// Set when the device attested with a client certificate.
    pub x509: Option<fleetgate_core::registration::X509RegistrationInfo>,
    /// The `api-version` the device's request named (MQTT username, HTTPS query), set by the
    /// front end: a few answers depend on it (see [`reports_reprovisioned_to_initial`]).
    pub api_version: Option<String>,
}

/// Whether a device speaking `api_version` is told `reprovisionedToInitialAssignment`: Azure
/// added it in API version 2019-04-15 and answers older ones (the Python SDK's 2019-03-31)
/// `initialAssignment` (the C# SDK's `ProvisioningRegistrationSubstatus` documentation). A device
/// that names none is taken to speak a current version. Versions are ISO dates, so they compare
/// as text.
pub fn reports_reprovisioned_to_initial(api_version: Option<&str>) -> bool {
    api_version.is_none_or(|v| v.get(..10).unwrap_or(v) >= "2019-04-15")
}

/// Where DPS reports that a device's hub identity no longer authenticates with what it did:
/// re-provisioning gave it other keys, thumbprints or CA certificates, or moved it to another
/// hub. A connection the device opened with the old credentials must not outlive them (Azure
/// closes it too). The server connects this to the hub's sessions: dps and hub never import each
/// other.
pub trait IdentityChanges: Send + Sync {
    /// Identity `device_id` on `hub` was given other credentials or removed from `hub`; called
    /// after the change is committed.
    fn credentials_revoked(&self, hub: &str, device_id: &str);
}

/// The result of a register request: a record to report (assigned, assigning, failed or
/// disabled).
#[derive(Debug, Clone)]
pub struct RegisterOutcome {
    pub record: RegistrationRecord,
}

pub struct Provisioning {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: ProvisioningConfig,
    /// Enrollment groups, read on every device authentication.
    groups: Cached<Vec<EnrollmentGroup>>,
    /// The registration ids (lower-cased) with an individual enrollment: a device without one
    /// is authenticated without a store read.
    individuals: Cached<HashSet<String>>,
    /// For custom allocation webhooks.
    pub(crate) http: reqwest::Client,
    /// Lets a request hand work (a webhook call) to a task that outlives it.
    pub(crate) me: Weak<Provisioning>,
    /// The ID scope's registration quota.
    throttle: Option<Mutex<TokenBucket>>,
    started: Instant,
    /// Attestation attempts and service-side changes.
    pub(crate) audit: AuditLog,
    /// Told when a commit takes credentials away from a hub identity.
    pub(crate) identity_changes: Arc<dyn IdentityChanges>,
    /// Told when a hub is linked or unlinked or a key renewed (see [`crate::linked_hubs`]).
    pub(crate) instance_changes: std::sync::OnceLock<Arc<dyn crate::linked_hubs::InstanceChanges>>,
}

/// See `impl From<StoreError> for AzureError`: a store fault is a retryable 503.
pub(crate) fn store_err(e: StoreError) -> AzureError {
    e.into()
}

pub(crate) fn unix_now() -> i64 {
    Timestamp::now().unix_seconds()
}

impl Provisioning {
    pub fn new(
        store: Arc<dyn Store>,
        config: ProvisioningConfig,
        identity_changes: Arc<dyn IdentityChanges>,
    ) -> Arc<Self> {
        let audit = AuditLog::start(store.clone());
        Self::with_audit(store, config, identity_changes, audit)
    }

    /// [`Provisioning::new`] recording into `audit`, which the server shares with the hub so
    /// that refusals are counted per source whichever service refused them.
    pub fn with_audit(
        store: Arc<dyn Store>,
        config: ProvisioningConfig,
        identity_changes: Arc<dyn IdentityChanges>,
        audit: AuditLog,
    ) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.webhook_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with default TLS settings builds");
        let throttle = config.registration_rate.map(|r| Mutex::new(TokenBucket::new(r, 0.0)));
        Arc::new_cyclic(|me| Self {
            audit,
            store,
            config,
            groups: Cached::new(),
            individuals: Cached::new(),
            http,
            me: me.clone(),
            throttle,
            started: Instant::now(),
            identity_changes,
            instance_changes: std::sync::OnceLock::new(),
        })
    }

    /// Admits one registration under the ID scope's quota, or answers 429 (the device retries
    /// after `retry-after`, as every SDK does). Polls are not counted, as in Azure.
    pub fn admit_registration(&self) -> Result<(), AzureError> {
        let Some(bucket) = &self.throttle else { return Ok(()) };
        let now = self.started.elapsed().as_secs_f64();
        let admitted = bucket.lock().unwrap_or_else(|p| p.into_inner()).try_take(now);
        admitted.map_err(|wait| {
            // Debug: counted in the throttled metric; a line per refused request would be a flood.
            tracing::debug!("registration throttled");
            // Told the real wait until the bucket frees a slot, so a device that obeys it is
            // admitted on its next try instead of being refused again (or waiting too long).
            AzureError::new(ErrorCode::Throttled, "Too many registrations for this ID scope; retry later.")
                .with_retry_after(fleetgate_core::throttle::retry_after_secs(wait))
        })
    }

    pub fn config(&self) -> &ProvisioningConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The audit trail's entries matching `query` (`GET /audit`), including every one recorded
    /// before the call.
    pub async fn audit_entries(
        &self,
        query: &fleetgate_core::audit::AuditQuery,
    ) -> Result<Vec<fleetgate_core::audit::AuditEntry>, AzureError> {
        self.audit.flush().await;
        self.store.audit(query).await.map_err(store_err)
    }

    pub(crate) fn invalidate_groups(&self) {
        self.groups.invalidate();
    }

    pub(crate) async fn cached_groups(&self) -> Result<Arc<Vec<EnrollmentGroup>>, AzureError> {
        self.groups.get(|| async { self.store.groups().await.map_err(store_err) }).await
    }

    /// Whether `registration_id` has an individual enrollment (from memory).
    pub(crate) async fn has_individual_enrollment(&self, registration_id: &str) -> Result<bool, AzureError> {
        let ids = self
            .individuals
            .get(|| async {
                Ok::<_, AzureError>(self.store.enrollment_ids().await.map_err(store_err)?.into_iter().collect())
            })
            .await?;
        Ok(ids.contains(&registration_id.to_ascii_lowercase()))
    }

    /// Records that `registration_id` may have an individual enrollment from now on. Called
    /// before the enrollment is written, so a device never misses it (an extra read if the
    /// write then fails).
    pub(crate) fn individual_enrollment_may_exist(&self, registration_id: &str) {
        self.individuals.update(|ids| {
            ids.insert(registration_id.to_ascii_lowercase());
        });
    }

    /// Records that `registration_id`'s individual enrollment was deleted.
    pub(crate) fn individual_enrollment_deleted(&self, registration_id: &str) {
        self.individuals.update(|ids| {
            ids.remove(&registration_id.to_ascii_lowercase());
        });
    }

    pub async fn linked_hubs(&self) -> Result<Vec<String>, AzureError> {
        Ok(self.store.hubs().await.map_err(store_err)?.into_iter().map(|h| h.host_name).collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reprovisioned_to_initial_assignment_from_api_2019_04_15() {
        use super::reports_reprovisioned_to_initial as r;
        assert!(r(None) && r(Some("2019-04-15")) && r(Some("2021-06-01")) && r(Some("2021-10-01-preview")));
        assert!(!r(Some("2019-03-31")) && !r(Some("2018-11-01")));
    }
}
