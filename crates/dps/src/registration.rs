//! What devices ask of [`Provisioning`]: attestation, registration (allocation, reprovisioning,
//! custom webhooks) and operation status.

use std::sync::Arc;

use fleetgate_core::allocation::{allocate, check_custom_choice, Allocation, CustomAllocationResult, HubCandidate};
use fleetgate_core::attestation::{derived_device_keys, find_group, KeySlot};
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::{
    CustomAllocationDefinition, EnrollmentGroup, EnrollmentSettings, IndividualEnrollment,
};
use fleetgate_core::ids::RegistrationId;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::registration::{decide_assignment, Assignment, RegistrationRecord, RegistrationStatus};
use fleetgate_core::sas::{SasError, SasToken};
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::Twin;
use fleetgate_core::{DpsError, ErrorCode};
use serde_json::Value;

use crate::service::{store_err, unix_now, DeviceAuth, EnrollmentRef, RegisterOutcome};
use crate::Provisioning;

/// The enrollment a registration is decided by, freshly read.
enum Enrollment {
    Group(EnrollmentGroup),
    Individual(IndividualEnrollment),
}

impl Enrollment {
    fn settings(&self) -> &EnrollmentSettings {
        match self {
            Enrollment::Group(g) => &g.settings,
            Enrollment::Individual(e) => &e.settings,
        }
    }

    fn group_id(&self) -> Option<&str> {
        match self {
            Enrollment::Group(g) => Some(&g.enrollment_group_id),
            Enrollment::Individual(_) => None,
        }
    }

    /// The keys the hub identity gets: derived from the group's, or the enrollment's own.
    fn device_keys(&self, registration_id: &str) -> Vec<SymmetricKey> {
        match self {
            Enrollment::Group(g) => derived_device_keys(g, registration_id),
            Enrollment::Individual(e) => e.keys(),
        }
    }

    /// The enrollment as a custom allocation webhook receives it (keys left out).
    fn webhook_view(&self) -> (&'static str, Value) {
        match self {
            Enrollment::Group(g) => ("enrollmentGroup", serde_json::to_value(g.redacted()).unwrap_or_default()),
            Enrollment::Individual(e) => {
                ("individualEnrollment", serde_json::to_value(e.redacted()).unwrap_or_default())
            }
        }
    }
}

impl Provisioning {
    /// Checks a device's SAS token for `{idScope}/registrations/{registrationId}`: against the
    /// individual enrollment of that registration id if there is one (it takes precedence, as in
    /// Azure), else against every enrollment group's keys derived for the id. Any failure is the
    /// same 401 to the device; the reason is only logged.
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
        if let Some(individual) = self.store.enrollment(registration_id.as_str()).await.map_err(store_err)? {
            let slot = [KeySlot::Primary, KeySlot::Secondary]
                .into_iter()
                .zip(individual.keys())
                .find(|(_, k)| token.signed_with(k));
            return match slot {
                Some((slot, _)) => {
                    Ok(DeviceAuth { registration_id, enrollment: EnrollmentRef::Individual, key_slot: slot })
                }
                None => Err(refuse("the individual enrollment's keys do not match the signature")),
            };
        }
        let previous = self.store.registration(registration_id.as_str()).await.map_err(store_err)?;
        let groups = self.cached_groups().await?;
        let preferred = previous.as_ref().and_then(|r| r.enrollment_group_id.as_deref());
        match find_group(&token, registration_id.as_str(), &groups, preferred) {
            Some((group, slot)) => Ok(DeviceAuth {
                registration_id: registration_id.clone(),
                enrollment: EnrollmentRef::Group(group.enrollment_group_id.clone()),
                key_slot: slot,
            }),
            None => Err(refuse("no enrollment group key matches the signature")),
        }
    }

    async fn enrollment_of(&self, auth: &DeviceAuth) -> Result<Option<Enrollment>, DpsError> {
        Ok(match &auth.enrollment {
            EnrollmentRef::Group(id) => self.store.group(id).await.map_err(store_err)?.map(Enrollment::Group),
            EnrollmentRef::Individual => self
                .store
                .enrollment(auth.registration_id.as_str())
                .await
                .map_err(store_err)?
                .map(Enrollment::Individual),
        })
    }

    async fn hub_candidates(&self) -> Result<Vec<HubCandidate>, DpsError> {
        Ok(self.store.hubs().await.map_err(store_err)?.iter().map(|h| h.candidate()).collect())
    }

    /// Decides and records the device's assignment. A custom allocation is decided by a webhook
    /// in the background: the outcome is then `assigning`, and the device polls.
    pub async fn register(&self, auth: &DeviceAuth, payload: Option<Value>) -> Result<RegisterOutcome, DpsError> {
        let now = Timestamp::now();
        let id = &auth.registration_id;
        // Re-read the enrollment: it may have been disabled or deleted since the device connected.
        let Some(enrollment) = self.enrollment_of(auth).await? else {
            tracing::info!(registration_id = %id, "enrollment deleted since authentication");
            return Err(DpsError::unauthorized());
        };
        let existing = self.store.registration(id.as_str()).await.map_err(store_err)?;
        if !enrollment.settings().is_enabled() {
            tracing::info!(registration_id = %id, "enrollment disabled");
            let err = DpsError::new(ErrorCode::Unauthorized, "The enrollment is disabled.");
            let record = RegistrationRecord::failed(
                existing.as_ref(),
                id,
                enrollment.group_id(),
                RegistrationStatus::Disabled,
                &err,
                now,
            );
            return Ok(RegisterOutcome { record });
        }
        let hubs = self.hub_candidates().await?;
        match allocate(enrollment.settings(), &hubs, &id.key()) {
            Ok(Allocation::Hub(hub)) => {
                let record = self.commit(auth, &enrollment, existing.as_ref(), &hub, None, payload, None, None).await?;
                Ok(RegisterOutcome { record })
            }
            Ok(Allocation::Custom(def)) => {
                let record =
                    RegistrationRecord::assigning(existing.as_ref(), id, enrollment.group_id(), payload.clone(), now);
                self.store.put_registration(&record).await.map_err(store_err)?;
                let Some(me) = self.me.upgrade() else { return Err(DpsError::internal()) };
                let (auth, op) = (auth.clone(), record.operation_id.clone());
                tokio::spawn(async move { me.finish_custom(auth, enrollment, existing, def, payload, op).await });
                Ok(RegisterOutcome { record })
            }
            Err(err) => {
                tracing::warn!(registration_id = %id, error = %err, "allocation failed");
                let record = RegistrationRecord::failed(
                    existing.as_ref(),
                    id,
                    enrollment.group_id(),
                    RegistrationStatus::Failed,
                    &err,
                    now,
                );
                self.store.put_registration(&record).await.map_err(store_err)?;
                Ok(RegisterOutcome { record })
            }
        }
    }

    /// Asks the webhook, then commits its choice (or the failure, with the reason) under the
    /// operation id the device is polling.
    async fn finish_custom(
        self: Arc<Self>,
        auth: DeviceAuth,
        enrollment: Enrollment,
        existing: Option<RegistrationRecord>,
        def: CustomAllocationDefinition,
        payload: Option<Value>,
        operation_id: String,
    ) {
        let id = &auth.registration_id;
        let result = async {
            let hubs = self.hub_candidates().await?;
            let current = existing
                .as_ref()
                .filter(|r| r.status == RegistrationStatus::Assigned)
                .and_then(|r| Some((r.assigned_hub.clone()?, r.device_id.clone()?)));
            let linked: Vec<String> = fleetgate_core::allocation::candidates(enrollment.settings(), &hubs)
                .iter()
                .map(|h| h.host_name.clone())
                .collect();
            let request = fleetgate_core::allocation::custom_allocation_request(
                enrollment.webhook_view(),
                id.as_str(),
                current.as_ref().map(|(h, d)| (h.as_str(), d.as_str())),
                payload.as_ref(),
                &linked,
            );
            let answer: CustomAllocationResult = crate::webhook::call(&self.http, &def, &request).await?;
            let hub = check_custom_choice(enrollment.settings(), &hubs, &answer.iot_hub_host_name)?;
            if let Some(t) = &answer.initial_twin {
                Twin::from_initial(Some(t))?;
            }
            self.commit(
                &auth,
                &enrollment,
                existing.as_ref(),
                &hub,
                answer.initial_twin.as_ref(),
                payload.clone(),
                answer.payload.clone(),
                Some(&operation_id),
            )
            .await
        }
        .await;
        if let Err(err) = result {
            tracing::warn!(registration_id = %id, error = %err, "custom allocation failed");
            let mut record = RegistrationRecord::failed(
                existing.as_ref(),
                id,
                enrollment.group_id(),
                RegistrationStatus::Failed,
                &err,
                Timestamp::now(),
            );
            record.operation_id = operation_id;
            if let Err(e) = self.store.put_registration(&record).await {
                tracing::error!(error = %e, "could not record a failed custom allocation");
            }
        }
    }

    /// Commits an assignment to `allocated`, following the enrollment's reprovision policy: the
    /// record, the hub identity and its twin (and the removal from a previous hub) in one
    /// transaction.
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        auth: &DeviceAuth,
        enrollment: &Enrollment,
        existing: Option<&RegistrationRecord>,
        allocated: &str,
        initial_twin_override: Option<&Value>,
        device_payload: Option<Value>,
        returned_payload: Option<Value>,
        operation_id: Option<&str>,
    ) -> Result<RegistrationRecord, DpsError> {
        let now = Timestamp::now();
        let id = &auth.registration_id;
        let settings = enrollment.settings();
        let device_id = match enrollment {
            Enrollment::Individual(e) => e.device_id.clone(),
            Enrollment::Group(_) => None,
        }
        .or_else(|| existing.and_then(|r| r.device_id.clone()))
        .unwrap_or_else(|| id.as_str().to_owned());
        let initial = || Twin::from_initial(initial_twin_override.or(settings.initial_twin.as_ref()));
        let keys = enrollment.device_keys(id.as_str());

        let (hub, substatus, twin, moved_from) =
            match decide_assignment(existing, settings.reprovision_policy, allocated) {
                Assignment::Keep { hub, substatus } => {
                    let present = self.store.device(&hub, &device_id).await.map_err(store_err)?;
                    // An identity the operator deleted is created again, from the initial twin.
                    let twin = if present.is_none() { Some(initial()?) } else { None };
                    (hub, substatus, twin, None)
                }
                Assignment::Move { hub, substatus, from, migrate_twin } => {
                    let old_device = existing.and_then(|r| r.device_id.clone()).unwrap_or_else(|| device_id.clone());
                    let carried = match (&from, migrate_twin) {
                        (Some(from), true) => {
                            self.store.twin(from, &old_device).await.map_err(store_err)?.map(|(_, t)| t)
                        }
                        _ => None,
                    };
                    let twin = match carried {
                        Some(t) => t,
                        None => initial()?,
                    };
                    (hub, substatus, Some(twin), from.map(|f| (f, old_device)))
                }
            };
        let mut record = RegistrationRecord::assigned(
            existing,
            id,
            enrollment.group_id(),
            &device_id,
            &hub,
            substatus,
            returned_payload,
            device_payload,
            now,
        );
        if let Some(op) = operation_id {
            record.operation_id = op.to_owned();
        }
        let present = self.store.device(&hub, &device_id).await.map_err(store_err)?;
        let device = DeviceIdentity::provisioned(present.as_ref(), &hub, &device_id, &keys, now);
        self.store
            .commit_assignment(
                &record,
                &device,
                twin.as_ref(),
                moved_from.as_ref().map(|(h, d)| (h.as_str(), d.as_str())),
            )
            .await
            .map_err(store_err)?;
        tracing::info!(registration_id = %id, hub = %hub, substatus = ?substatus, "device assigned");
        Ok(record)
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
