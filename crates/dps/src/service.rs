//! [`Provisioning`]: the DPS decisions, independent of any wire protocol.

use std::sync::{Arc, RwLock};

use fleetgate_core::allocation::allocate;
use fleetgate_core::attestation::{derived_device_keys, find_group, KeySlot};
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::EnrollmentGroup;
use fleetgate_core::ids::{IdScope, RegistrationId};
use fleetgate_core::registration::{RegistrationRecord, RegistrationStatus};
use fleetgate_core::sas::{SasError, SasToken};
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::Twin;
use fleetgate_core::{DpsError, ErrorCode};
use fleetgate_store::{Store, StoreError};
use serde_json::Value;

/// What the provisioning service needs to know about its instance.
#[derive(Clone, Debug)]
pub struct ProvisioningConfig {
    pub id_scope: IdScope,
    /// Host names the service API answers to (a token's `sr` must name one of them).
    pub service_host_names: Vec<String>,
    /// Shared access policies of the service API: (name, key).
    pub policies: Vec<(String, fleetgate_core::keys::SymmetricKey)>,
    /// Answer a register request with the final 200 straight away (all SDKs accept it) rather
    /// than 202 + operation-status polling.
    pub immediate_assignment: bool,
}

/// A device that proved it holds a key derived from an enrollment group's key.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    pub registration_id: RegistrationId,
    pub group_id: String,
    pub key_slot: KeySlot,
}

/// The result of a register request: a record to report (assigned, failed or disabled).
#[derive(Debug, Clone)]
pub struct RegisterOutcome {
    pub record: RegistrationRecord,
}

pub struct Provisioning {
    store: Arc<dyn Store>,
    config: ProvisioningConfig,
    /// Enrollment groups, read on every device authentication; refreshed after each change made
    /// through this process. `None` = reload from the store.
    groups: RwLock<Option<Arc<Vec<EnrollmentGroup>>>>,
}

pub(crate) fn store_err(e: StoreError) -> DpsError {
    match e {
        StoreError::Rejected(d) => d,
        StoreError::Backend(msg) => {
            tracing::error!(error = %msg, "store failure");
            DpsError::internal()
        }
    }
}

fn unix_now() -> i64 {
    Timestamp::now().unix_seconds()
}

impl Provisioning {
    pub fn new(store: Arc<dyn Store>, config: ProvisioningConfig) -> Self {
        Self { store, config, groups: RwLock::new(None) }
    }

    pub fn config(&self) -> &ProvisioningConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn invalidate_groups(&self) {
        *self.groups.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    async fn cached_groups(&self) -> Result<Arc<Vec<EnrollmentGroup>>, DpsError> {
        if let Some(g) = self.groups.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(g);
        }
        let fresh = Arc::new(self.store.groups().await.map_err(store_err)?);
        *self.groups.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        Ok(fresh)
    }

    pub async fn linked_hubs(&self) -> Result<Vec<String>, DpsError> {
        Ok(self.store.hubs().await.map_err(store_err)?.into_iter().map(|h| h.host_name).collect())
    }

    /// Checks a device's SAS token for `{idScope}/registrations/{registrationId}` against every
    /// enrollment group's derived keys. Any failure is the same 401 to the device; the reason is
    /// only logged.
    pub async fn authenticate(
        &self,
        scope: &str,
        registration_id: &str,
        password: Option<&str>,
    ) -> Result<DeviceAuth, DpsError> {
        let registration_id = RegistrationId::parse(registration_id)?;
        let refuse = |why: &str| {
            tracing::info!(registration_id = %registration_id, reason = why, "device attestation refused");
            DpsError::unauthorized()
        };
        if !self.config.id_scope.matches(scope) {
            return Err(refuse("unknown ID scope"));
        }
        let Some(password) = password else {
            return Err(refuse("no SAS token"));
        };
        let token = SasToken::parse(password).map_err(|e| refuse(&e.to_string()))?;
        let expected = format!("{}/registrations/{}", self.config.id_scope, registration_id);
        token.check_expiry(unix_now()).map_err(|e| refuse(&e.to_string()))?;
        // A device token is for exactly its own registration (compared case-insensitively).
        if !token.resource.trim_end_matches('/').eq_ignore_ascii_case(&expected) {
            return Err(refuse(&SasError::WrongResource.to_string()));
        }
        let previous = self.store.registration(registration_id.as_str()).await.map_err(store_err)?;
        let groups = self.cached_groups().await?;
        let preferred = previous.as_ref().and_then(|r| r.enrollment_group_id.as_deref());
        match find_group(&token, registration_id.as_str(), &groups, preferred) {
            Some((group, slot)) => Ok(DeviceAuth {
                registration_id: registration_id.clone(),
                group_id: group.enrollment_group_id.clone(),
                key_slot: slot,
            }),
            None => Err(refuse("no enrollment group key matches the signature")),
        }
    }

    /// Decides and records the device's assignment.
    pub async fn register(&self, auth: &DeviceAuth, payload: Option<Value>) -> Result<RegisterOutcome, DpsError> {
        let now = Timestamp::now();
        let id = &auth.registration_id;
        // Re-read the group: it may have been disabled or deleted since the device connected.
        let Some(group) = self.store.group(&auth.group_id).await.map_err(store_err)? else {
            tracing::info!(registration_id = %id, "enrollment group deleted since authentication");
            return Err(DpsError::unauthorized());
        };
        let existing = self.store.registration(id.as_str()).await.map_err(store_err)?;
        if !group.is_enabled() {
            tracing::info!(registration_id = %id, group = %group.enrollment_group_id, "enrollment group disabled");
            let err = DpsError::new(ErrorCode::Unauthorized, "The enrollment is disabled.");
            let mut record = RegistrationRecord::failed(
                existing.as_ref(),
                id,
                &group.enrollment_group_id,
                RegistrationStatus::Disabled,
                &err,
                now,
            );
            record.payload = None;
            return Ok(RegisterOutcome { record });
        }
        let hubs = self.linked_hubs().await?;
        let hub = match allocate(&group, &hubs, &id.key()) {
            Ok(h) => h,
            Err(err) => {
                tracing::warn!(registration_id = %id, error = %err, "allocation failed");
                let record = RegistrationRecord::failed(
                    existing.as_ref(),
                    id,
                    &group.enrollment_group_id,
                    RegistrationStatus::Failed,
                    &err,
                    now,
                );
                self.store.put_registration(&record).await.map_err(store_err)?;
                return Ok(RegisterOutcome { record });
            }
        };
        let record =
            RegistrationRecord::assigned(existing.as_ref(), id, &group.enrollment_group_id, &hub, payload, now);
        let device_id = record.device_id.clone().unwrap_or_else(|| id.as_str().to_owned());
        let existing_device = self.store.device(&hub, &device_id).await.map_err(store_err)?;
        // A new device starts from the enrollment's initial twin; an existing one keeps its twin.
        let twin = match &existing_device {
            None => Some(Twin::from_initial(group.initial_twin.as_ref())?),
            Some(_) => None,
        };
        let device = DeviceIdentity::provisioned(
            existing_device.as_ref(),
            &hub,
            &device_id,
            &derived_device_keys(&group, id.as_str()),
            now,
        );
        self.store.commit_assignment(&record, &device, twin.as_ref()).await.map_err(store_err)?;
        tracing::info!(registration_id = %id, hub = %hub, group = %group.enrollment_group_id, "device assigned");
        Ok(RegisterOutcome { record })
    }

    /// The state of a registration operation the device started earlier.
    pub async fn operation_status(
        &self,
        auth: &DeviceAuth,
        operation_id: &str,
    ) -> Result<RegistrationRecord, DpsError> {
        let record = self.store.registration(auth.registration_id.as_str()).await.map_err(store_err)?;
        match record {
            Some(r) if r.operation_id == operation_id => Ok(r),
            _ => {
                Err(DpsError::new(ErrorCode::OperationNotFound, "The operation id is not known for this registration."))
            }
        }
    }
}

impl Provisioning {
    /// Checks a service API `Authorization` header: a SAS token signed with the key of the
    /// policy it names (`skn`), for one of this instance's host names (a `:port` is ignored).
    /// Returns the policy name.
    pub fn authorize_service(&self, authorization: Option<&str>) -> Result<String, DpsError> {
        let refuse = |why: &str| {
            tracing::info!(reason = why, "service API request refused");
            DpsError::unauthorized()
        };
        let header = authorization.ok_or_else(|| refuse("no Authorization header"))?;
        let token = SasToken::parse(header).map_err(|e| refuse(&e.to_string()))?;
        token.check_expiry(unix_now()).map_err(|e| refuse(&e.to_string()))?;
        let name = token.key_name.clone().ok_or_else(|| refuse("token names no policy (skn)"))?;
        let Some((policy, key)) = self.config.policies.iter().find(|(n, _)| n.eq_ignore_ascii_case(&name)) else {
            return Err(refuse("unknown policy"));
        };
        let host = token.resource.split('/').next().unwrap_or("");
        let host =
            host.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !self
            .config
            .service_host_names
            .iter()
            .any(|h| h.trim_start_matches('[').trim_end_matches(']').eq_ignore_ascii_case(host))
        {
            return Err(refuse("token is for another host"));
        }
        if !token.signed_with(key) {
            return Err(refuse("signature does not match"));
        }
        Ok(policy.clone())
    }

    pub async fn put_group(
        &self,
        id: &str,
        body: &[u8],
        if_match: Option<String>,
    ) -> Result<EnrollmentGroup, DpsError> {
        let request = EnrollmentGroup::from_request_body(body)?;
        let hubs = self.linked_hubs().await?;
        let path_id = id.to_owned();
        let result = self
            .store
            .upsert_group(
                id,
                Box::new(move |current| {
                    if if_match.is_some() {
                        fleetgate_core::enrollment::check_if_match(
                            if_match.as_deref(),
                            current.and_then(|g| g.etag.as_deref()),
                        )?;
                    }
                    request.prepare_upsert(&path_id, current, &hubs, Timestamp::now())
                }),
            )
            .await
            .map_err(store_err);
        self.invalidate_groups();
        let group = result?;
        tracing::info!(group = %group.enrollment_group_id, status = ?group.provisioning_status, "enrollment group written");
        Ok(group)
    }

    pub async fn group(&self, id: &str) -> Result<EnrollmentGroup, DpsError> {
        self.store.group(id).await.map_err(store_err)?.ok_or_else(|| {
            DpsError::new(
                ErrorCode::EnrollmentGroupNotFound,
                format!("Enrollment group '{}' was not found.", printable(id)),
            )
        })
    }

    pub async fn groups(&self) -> Result<Vec<EnrollmentGroup>, DpsError> {
        self.store.groups().await.map_err(store_err)
    }

    pub async fn delete_group(&self, id: &str, if_match: Option<&str>) -> Result<(), DpsError> {
        let deleted = self.store.delete_group(id, if_match).await.map_err(store_err);
        self.invalidate_groups();
        if deleted? {
            tracing::info!(group = %printable(id), "enrollment group deleted");
            Ok(())
        } else {
            Err(DpsError::new(
                ErrorCode::EnrollmentGroupNotFound,
                format!("Enrollment group '{}' was not found.", printable(id)),
            ))
        }
    }

    pub async fn registration(&self, id: &str) -> Result<RegistrationRecord, DpsError> {
        self.store.registration(id).await.map_err(store_err)?.ok_or_else(|| {
            DpsError::new(ErrorCode::RegistrationNotFound, format!("Registration '{}' was not found.", printable(id)))
        })
    }

    pub async fn registrations_of_group(
        &self,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<RegistrationRecord>, DpsError> {
        self.store.registrations_of_group(group_id, offset, limit).await.map_err(store_err)
    }

    pub async fn delete_registration(&self, id: &str, if_match: Option<&str>) -> Result<(), DpsError> {
        if self.store.delete_registration(id, if_match).await.map_err(store_err)? {
            tracing::info!(registration_id = %printable(id), "registration record deleted");
            Ok(())
        } else {
            Err(DpsError::new(
                ErrorCode::RegistrationNotFound,
                format!("Registration '{}' was not found.", printable(id)),
            ))
        }
    }
}

/// An id from a URL, made safe to echo: bounded length, no control characters.
fn printable(s: &str) -> String {
    s.chars().take(140).map(|c| if c.is_control() { '?' } else { c }).collect()
}
