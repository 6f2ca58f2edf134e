//! What devices ask of [`Provisioning`]: attestation, registration (allocation, reprovisioning,
//! custom webhooks) and operation status.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fleetgate_core::allocation::{allocate, check_custom_choice, Allocation, CustomAllocationResult, HubCandidate};
use fleetgate_core::attestation::{derived_device_keys, find_groups, prefer_group, KeySlot};
use fleetgate_core::device::{DeviceCredentials, DeviceIdentity};
use fleetgate_core::enrollment::{
    CustomAllocationDefinition, EnrollmentGroup, EnrollmentSettings, IndividualEnrollment, X509Trust,
};
use fleetgate_core::ids::RegistrationId;
use fleetgate_core::registration::{
    decide_assignment, Assignment, RegistrationRecord, RegistrationStatus, Substatus, X509RegistrationInfo,
};
use fleetgate_core::sas::{SasError, SasToken};
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::Twin;
use fleetgate_core::x509::{check_leaf, require_common_name, verify_chain, Certificate, CertificateChain};
use fleetgate_core::{AzureError, ErrorCode};
use serde_json::Value;

use crate::service::{
    reports_reprovisioned_to_initial, store_err, unix_now, DeviceAuth, EnrollmentRef, RegisterOutcome,
};
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

    /// What the hub identity authenticates with: keys derived from the group's, or the
    /// enrollment's own; for X.509, the enrollment's device certificate thumbprints
    /// (`selfSigned`) or its CA certificates (`certificateAuthority`).
    fn device_credentials(&self, registration_id: &str) -> DeviceCredentials {
        match self.settings().x509_trust() {
            Some(X509Trust::Pinned(certs)) => {
                let thumbprint = |i: usize| certs.get(i).and_then(Option::as_ref).map(Certificate::sha256_thumbprint);
                DeviceCredentials::SelfSigned { primary: thumbprint(0), secondary: thumbprint(1) }
            }
            Some(X509Trust::CertificateAuthority(cas)) => {
                DeviceCredentials::CertificateAuthority(cas.iter().flatten().map(Certificate::to_base64).collect())
            }
            None => DeviceCredentials::Keys(match self {
                Enrollment::Group(g) => derived_device_keys(g, registration_id),
                Enrollment::Individual(e) => e.keys(),
            }),
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
    /// Records a refused attestation (the reason is Fleetgate's, never a key or signature),
    /// counted per source address (see [`fleetgate_store::AuditLog::refused`]).
    fn audit_refusal(&self, source: Option<IpAddr>, registration_id: &str, why: &str) {
        use fleetgate_core::audit::{AuditCategory, AuditEntry, Outcome};
        let entry = AuditEntry::new(AuditCategory::DeviceOperations, "attest", registration_id, Outcome::Failure)
            .reason(why)
            .status(401);
        // Its one log line is the audit trail's mirror (`operation=attest`, with the reason): as
        // many as the trail records in full for the source, a flood being one summary.
        self.audit.refused(source, entry);
    }

    /// Checks a device's SAS token for `{idScope}/registrations/{registrationId}`: against the
    /// individual enrollment of that registration id if there is one (it takes precedence, as in
    /// Azure), else against every enrollment group's keys derived for the id. Without a token,
    /// the client certificate chain of its TLS connection is checked instead (see
    /// [`Provisioning::authenticate_x509`]). Any refusal is the same 401 to the device; the
    /// reason is only recorded. A check the store could not make is a 503 (the device retries),
    /// never a refusal. `source` is the address the request came from, for the audit trail and
    /// the per-source limit on refusals.
    pub async fn authenticate(
        &self,
        scope: &str,
        registration_id: &str,
        password: Option<&str>,
        certificates: Option<&CertificateChain>,
        source: Option<IpAddr>,
    ) -> Result<DeviceAuth, AzureError> {
        let registration_id = RegistrationId::parse(registration_id)?;
        let refuse = |why: &str| {
            self.audit_refusal(source, registration_id.as_str(), why);
            AzureError::unauthorized()
        };
        if !self.config.id_scope.matches(scope) {
            return Err(refuse("unknown ID scope"));
        }
        let Some(password) = password else {
            return match certificates {
                Some(chain) => self.authenticate_x509(registration_id, chain, source).await,
                None => Err(refuse("neither a SAS token nor a client certificate")),
            };
        };
        let token = SasToken::parse(password).map_err(|e| refuse(&e.to_string()))?;
        let expected = format!("{}/registrations/{}", self.config.id_scope, registration_id);
        token.check_expiry(unix_now()).map_err(|e| refuse(&e.to_string()))?;
        // A device token is for exactly its own registration (compared case-insensitively).
        if !token.resource.trim_end_matches('/').eq_ignore_ascii_case(&expected) {
            return Err(refuse(&SasError::WrongResource.to_string()));
        }
        if let Some(individual) = self.individual_enrollment(&registration_id).await? {
            let slot = [KeySlot::Primary, KeySlot::Secondary]
                .into_iter()
                .zip(individual.keys())
                .find(|(_, k)| token.signed_with(k));
            return match slot {
                Some((slot, _)) => Ok(DeviceAuth {
                    registration_id,
                    enrollment: EnrollmentRef::Individual,
                    key_slot: slot,
                    x509: None,
                    api_version: None,
                }),
                None => Err(refuse("the individual enrollment's keys do not match the signature")),
            };
        }
        let groups = self.cached_groups().await?;
        let matches = find_groups(&token, registration_id.as_str(), &groups);
        // Only when several groups' keys sign alike does the group used last time decide.
        let chosen = match matches.as_slice() {
            [] | [_] => matches.first().copied(),
            _ => {
                let previous = self.store.registration(registration_id.as_str()).await.map_err(store_err)?;
                prefer_group(&matches, previous.as_ref().and_then(|r| r.enrollment_group_id.as_deref()))
            }
        };
        match chosen {
            Some((group, slot)) => Ok(DeviceAuth {
                registration_id: registration_id.clone(),
                enrollment: EnrollmentRef::Group(group.enrollment_group_id.clone()),
                key_slot: slot,
                x509: None,
                api_version: None,
            }),
            None => Err(refuse("no enrollment group key matches the signature")),
        }
    }

    /// X.509 attestation with the chain the device presented in its TLS handshake (which
    /// proved it holds the leaf's key). The leaf must be valid now, usable for client
    /// authentication, and name the registration id as its common name. Then, as for keys, the
    /// individual enrollment of the registration id decides alone if there is one: disabled, it
    /// blocks the device (Azure's way to revoke one device of a group); enabled, the leaf must be
    /// one of its certificates (or chain to its CA). Otherwise the chain must lead to an X.509
    /// group's CA certificate; the most specific CA (an intermediate over its root) wins.
    async fn authenticate_x509(
        &self,
        registration_id: RegistrationId,
        chain: &CertificateChain,
        source: Option<IpAddr>,
    ) -> Result<DeviceAuth, AzureError> {
        let refuse = |why: &dyn std::fmt::Display| {
            self.audit_refusal(source, registration_id.as_str(), &format!("X.509: {why}"));
            AzureError::unauthorized()
        };
        let now = unix_now();
        let leaf = check_leaf(chain, now).map_err(|e| refuse(&e))?;
        require_common_name(&leaf, registration_id.as_str()).map_err(|e| refuse(&e))?;
        let certificate_info = Some(leaf.info());
        let slots = |certs: Vec<Option<Certificate>>| -> Vec<(KeySlot, Certificate)> {
            [KeySlot::Primary, KeySlot::Secondary].into_iter().zip(certs).filter_map(|(s, c)| Some((s, c?))).collect()
        };

        if let Some(individual) = self.individual_enrollment(&registration_id).await? {
            if !individual.settings.is_enabled() {
                return Err(refuse(&"the registration id's individual enrollment is disabled (revoked)"));
            }
            let (key_slot, signing_certificate_info) = match individual.settings.x509_trust() {
                None => return Err(refuse(&"the individual enrollment does not use X.509 attestation")),
                Some(X509Trust::Pinned(certs)) => {
                    let pinned = slots(certs);
                    match pinned.iter().find(|(_, c)| c.der() == leaf.der()) {
                        Some((slot, _)) => (*slot, None),
                        None => return Err(refuse(&"the certificate is not one of the individual enrollment's")),
                    }
                }
                Some(X509Trust::CertificateAuthority(cas)) => {
                    let cas = slots(cas);
                    let only: Vec<Certificate> = cas.iter().map(|(_, c)| c.clone()).collect();
                    let m = verify_chain(chain, &only, now).map_err(|e| refuse(&e))?;
                    (cas[m.ca_index].0, Some(cas[m.ca_index].1.info()))
                }
            };
            return Ok(DeviceAuth {
                registration_id,
                enrollment: EnrollmentRef::Individual,
                key_slot,
                x509: Some(X509RegistrationInfo { certificate_info, signing_certificate_info }),
                api_version: None,
            });
        }

        let previous = self.store.registration(registration_id.as_str()).await.map_err(store_err)?;
        let preferred = previous.as_ref().and_then(|r| r.enrollment_group_id.clone());
        let groups = self.cached_groups().await?;
        // (intermediates on the path, not the preferred group, group, slot, CA)
        let mut best: Option<(usize, bool, &EnrollmentGroup, KeySlot, Certificate)> = None;
        let mut refusal: Option<fleetgate_core::x509::CertificateRefusal> = None;
        for group in groups.iter() {
            let Some(X509Trust::CertificateAuthority(cas)) = group.settings.x509_trust() else { continue };
            let cas = slots(cas);
            let only: Vec<Certificate> = cas.iter().map(|(_, c)| c.clone()).collect();
            match verify_chain(chain, &only, now) {
                Ok(m) => {
                    let other =
                        !preferred.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(&group.enrollment_group_id));
                    let rank = (m.intermediates, other);
                    if best.as_ref().is_none_or(|b| rank < (b.0, b.1)) {
                        let (slot, ca) = cas[m.ca_index].clone();
                        best = Some((m.intermediates, other, group, slot, ca));
                    }
                }
                Err(e) => {
                    // Keep the most telling reason: an unknown issuer is what every other group says.
                    if refusal.is_none() || !matches!(e, fleetgate_core::x509::CertificateRefusal::UnknownCa(_)) {
                        refusal = Some(e);
                    }
                }
            }
        }
        match best {
            Some((_, _, group, key_slot, ca)) => Ok(DeviceAuth {
                registration_id: registration_id.clone(),
                enrollment: EnrollmentRef::Group(group.enrollment_group_id.clone()),
                key_slot,
                x509: Some(X509RegistrationInfo { certificate_info, signing_certificate_info: Some(ca.info()) }),
                api_version: None,
            }),
            None => match refusal {
                Some(e) => Err(refuse(&format!("no X.509 enrollment group trusts the chain: {e}"))),
                None => Err(refuse(&"there is no X.509 enrollment group")),
            },
        }
    }

    /// The registration id's individual enrollment, read only if it has one.
    async fn individual_enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, AzureError> {
        if !self.has_individual_enrollment(id.as_str()).await? {
            return Ok(None);
        }
        self.store.enrollment(id.as_str()).await.map_err(store_err)
    }

    async fn enrollment_of(&self, auth: &DeviceAuth) -> Result<Option<Enrollment>, AzureError> {
        Ok(match &auth.enrollment {
            // The in-memory copy: every change to a group goes through this process's service
            // API, which refreshes it, so a disabled group is seen at once.
            EnrollmentRef::Group(id) => self
                .cached_groups()
                .await?
                .iter()
                .find(|g| g.enrollment_group_id.eq_ignore_ascii_case(id))
                .cloned()
                .map(Enrollment::Group),
            EnrollmentRef::Individual => self
                .store
                .enrollment(auth.registration_id.as_str())
                .await
                .map_err(store_err)?
                .map(Enrollment::Individual),
        })
    }

    async fn hub_candidates(&self) -> Result<Vec<HubCandidate>, AzureError> {
        Ok(self.store.hubs().await.map_err(store_err)?.iter().map(|h| h.candidate()).collect())
    }

    /// Decides and records the device's assignment. A custom allocation is decided by a webhook
    /// in the background: the outcome is then `assigning`, and the device polls.
    pub async fn register(&self, auth: &DeviceAuth, payload: Option<Value>) -> Result<RegisterOutcome, AzureError> {
        let now = Timestamp::now();
        let id = &auth.registration_id;
        // Re-read the enrollment: it may have been disabled or deleted since the device connected.
        let Some(enrollment) = self.enrollment_of(auth).await? else {
            tracing::info!(registration_id = %id, "enrollment deleted since authentication");
            return Err(AzureError::unauthorized());
        };
        let (existing, hubs) = self.store.assignment_inputs(id.as_str()).await.map_err(store_err)?;
        if !enrollment.settings().is_enabled() {
            tracing::info!(registration_id = %id, "enrollment disabled");
            let err = AzureError::new(ErrorCode::Unauthorized, "The enrollment is disabled.");
            let mut record = RegistrationRecord::failed(
                existing.as_ref(),
                id,
                enrollment.group_id(),
                RegistrationStatus::Disabled,
                &err,
                now,
            );
            record.internal.x509 = auth.x509.clone();
            // Kept, as Azure does: the registration state says `disabled` (not the assignment it
            // had before), and a device told to poll finds its operation.
            self.store.put_registration(&record).await.map_err(store_err)?;
            return Ok(RegisterOutcome { record });
        }
        let hubs: Vec<HubCandidate> = hubs.iter().map(|h| h.candidate()).collect();
        match allocate(enrollment.settings(), &hubs, &id.key()) {
            Ok(Allocation::Hub(hub)) => {
                let record = self.commit(auth, &enrollment, existing.as_ref(), &hub, None, payload, None, None).await?;
                Ok(RegisterOutcome { record })
            }
            Ok(Allocation::Custom(def)) => {
                let mut record =
                    RegistrationRecord::assigning(existing.as_ref(), id, enrollment.group_id(), payload.clone(), now);
                record.internal.x509 = auth.x509.clone();
                self.store.put_registration(&record).await.map_err(store_err)?;
                let Some(me) = self.me.upgrade() else { return Err(AzureError::internal()) };
                let (auth, op) = (auth.clone(), record.operation_id.clone());
                tokio::spawn(async move { me.finish_custom(auth, enrollment, existing, def, payload, op).await });
                Ok(RegisterOutcome { record })
            }
            Err(err) => {
                tracing::warn!(registration_id = %id, error = %err, "allocation failed");
                let mut record = RegistrationRecord::failed(
                    existing.as_ref(),
                    id,
                    enrollment.group_id(),
                    RegistrationStatus::Failed,
                    &err,
                    now,
                );
                record.internal.x509 = auth.x509.clone();
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
            record.internal.x509 = auth.x509.clone();
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
    ) -> Result<RegistrationRecord, AzureError> {
        let now = Timestamp::now();
        let id = &auth.registration_id;
        let settings = enrollment.settings();
        let device_id = match enrollment {
            Enrollment::Individual(e) => e.device_id.clone(),
            Enrollment::Group(_) => None,
        }
        .or_else(|| existing.and_then(|r| r.device_id.clone()))
        .unwrap_or_else(|| id.as_str().to_owned());
        let initial = initial_twin_override.or(settings.initial_twin.as_ref()).cloned();
        let credentials = enrollment.device_credentials(id.as_str());

        let decision = decide_assignment(existing, settings.reprovision_policy, allocated);
        let reset_in_place = matches!(decision, Assignment::Reset { .. });
        // `twin`: what a moved or reset device's twin becomes; `None` keeps the twin already on
        // the hub (made from the initial twin when the identity is not there).
        let (hub, substatus, twin, moved_from) = match decision {
            Assignment::Keep { hub, substatus } => (hub, substatus, None, None),
            Assignment::Reset { hub } => {
                (hub, Substatus::DeviceDataReset, Some(Twin::from_initial(initial.as_ref())?), None)
            }
            Assignment::Move { hub, substatus: Substatus::InitialAssignment, from: None, .. } => {
                // Azure (API 2019-04-15 on) reports a first assignment whose identity the hub
                // already has (DPS did not know the device: its record was deleted, or it was
                // created on the hub directly) as `reprovisionedToInitialAssignment`. Read ahead of
                // the commit: the substatus only informs, and an identity created or deleted in
                // between changes nothing else.
                let present = reports_reprovisioned_to_initial(auth.api_version.as_deref())
                    && self.store.device(&hub, &device_id).await.map_err(store_err)?.is_some();
                let substatus =
                    if present { Substatus::ReprovisionedToInitialAssignment } else { Substatus::InitialAssignment };
                (hub, substatus, Some(Twin::from_initial(initial.as_ref())?), None)
            }
            Assignment::Move { hub, substatus, from, migrate_twin } => {
                let old_device = existing.and_then(|r| r.device_id.clone()).unwrap_or_else(|| device_id.clone());
                let carried = match (&from, migrate_twin) {
                    (Some(from), true) => self.store.twin(from, &old_device).await.map_err(store_err)?.map(|(_, t)| t),
                    _ => None,
                };
                let twin = match carried {
                    Some(t) => t,
                    None => Twin::from_initial(initial.as_ref())?,
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
        record.internal.x509 = auth.x509.clone();
        let (target, target_id) = (hub.clone(), device_id.clone());
        // Set in the transaction when the identity already there gets other credentials (a
        // rolled group key, an enrollment's new keys or certificates).
        let replaced = Arc::new(AtomicBool::new(false));
        let replaced_in_tx = replaced.clone();
        // Decided in the store's transaction from the identity present there: an identity the
        // operator deleted is created again, from the initial twin.
        let device = Box::new(move |present: Option<(DeviceIdentity, Twin)>| {
            let (present, kept) = present.map_or((None, None), |(d, t)| (Some(d), Some(t)));
            let twin = match (twin, kept) {
                (Some(t), _) | (None, Some(t)) => t,
                (None, None) => Twin::from_initial(initial.as_ref())?,
            };
            let next = DeviceIdentity::provisioned_with(present.as_ref(), &target, &target_id, credentials, now);
            replaced_in_tx.store(present.is_some_and(|old| !old.same_credentials(&next)), Ordering::Relaxed);
            Ok((next, twin))
        });
        self.store
            .commit_assignment(
                &record,
                &hub,
                &device_id,
                device,
                moved_from.as_ref().map(|(h, d)| (h.as_str(), d.as_str())),
            )
            .await
            .map_err(store_err)?;
        // Committed: a connection opened with what the identity had must end (on the hub it left,
        // or with the credentials it lost).
        if let Some((from, old_device)) = &moved_from {
            tracing::info!(registration_id = %id, hub = %from, "device moved to another hub; closing its connection there");
            self.identity_changes.credentials_revoked(from, old_device);
        }
        if reset_in_place {
            // The twin under a live connection changed without a patch: the device reconnects and
            // reads the reset twin.
            tracing::info!(registration_id = %id, hub = %hub, "device data reset; closing its connection");
            self.identity_changes.credentials_revoked(&hub, &device_id);
        } else if replaced.load(Ordering::Relaxed) {
            tracing::info!(registration_id = %id, hub = %hub, "device credentials replaced; closing its connection");
            self.identity_changes.credentials_revoked(&hub, &device_id);
        }
        // Every assignment is in the audit trail; the log line is for debugging.
        tracing::debug!(registration_id = %id, hub = %hub, substatus = ?substatus, "device assigned");
        Ok(record)
    }

    /// The state of a registration operation the device started earlier.
    pub async fn operation_status(
        &self,
        auth: &DeviceAuth,
        operation_id: &str,
    ) -> Result<RegistrationRecord, AzureError> {
        let record = self.store.registration(auth.registration_id.as_str()).await.map_err(store_err)?;
        match record {
            Some(r) if r.operation_id == operation_id => Ok(r),
            _ => Err(AzureError::new(
                ErrorCode::OperationNotFound,
                "The operation id is not known for this registration.",
            )),
        }
    }
}
