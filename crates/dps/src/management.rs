//! What the DPS service API asks of [`Provisioning`]: policy checks, enrollment groups,
//! individual enrollments and registration records.

use fleetgate_core::enrollment::{EnrollmentGroup, IndividualEnrollment};
use fleetgate_core::policy::{authorize, Right};
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::sas::SasToken;
use fleetgate_core::time::Timestamp;
use fleetgate_core::{AzureError, ErrorCode};

use crate::service::{store_err, unix_now};
use crate::Provisioning;

/// Where the instance's policies live in the store.
pub(crate) const POLICY_OWNER: &str = "dps";

impl Provisioning {
    /// Checks a service API `Authorization` header: a SAS token for one of this instance's host
    /// names (any port), signed with a key of the policy it names (`skn`), which must have one of
    /// `needed`, and whose `sr` covers `path` (a token may be limited to a path under the host).
    /// Policies are read from the store on each call, so a renewed key takes effect at once.
    /// Returns the policy name.
    pub async fn authorize_service(
        &self,
        authorization: Option<&str>,
        needed: &[Right],
        path: &str,
    ) -> Result<String, AzureError> {
        let refuse = |why: &str| {
            // Debug: the refusal is in the audit trail, counted per source (a flood of them must
            // not become a flood of log lines).
            tracing::debug!(reason = why, "service API request refused");
            AzureError::unauthorized()
        };
        let header = authorization.ok_or_else(|| refuse("no Authorization header"))?;
        let token = SasToken::parse(header).map_err(|e| refuse(&e.to_string()))?;
        token.check_expiry(unix_now()).map_err(|e| refuse(&e.to_string()))?;
        let host = fleetgate_rest::token_host(&token.resource);
        if !self
            .config
            .service_host_names
            .iter()
            .any(|h| h.trim_start_matches('[').trim_end_matches(']').eq_ignore_ascii_case(host))
        {
            return Err(refuse("token is for another host"));
        }
        if !fleetgate_rest::token_covers(&token.resource, path) {
            return Err(refuse("token's resource does not cover this path"));
        }
        let policies = self.store.policies(POLICY_OWNER).await.map_err(store_err)?;
        let policy = authorize(&policies, &token, needed).map_err(|e| refuse(&e.to_string()))?;
        Ok(policy.key_name.clone())
    }

    pub async fn put_group(
        &self,
        id: &str,
        body: &[u8],
        if_match: Option<String>,
    ) -> Result<EnrollmentGroup, AzureError> {
        let request = EnrollmentGroup::from_request_body(body)?;
        let hubs = self.linked_hubs().await?;
        let path_id = id.to_owned();
        let result = self
            .store
            .upsert_group(
                id,
                Box::new(move |current| {
                    if if_match.is_some() {
                        fleetgate_core::etag::check_if_match(
                            if_match.as_deref(),
                            current.and_then(|g| g.settings.etag.as_deref()),
                        )?;
                    }
                    request.prepare_upsert(&path_id, current, &hubs, Timestamp::now())
                }),
            )
            .await
            .map_err(store_err);
        self.invalidate_groups();
        let group = result?;
        tracing::info!(group = %group.enrollment_group_id, status = ?group.settings.provisioning_status, "enrollment group written");
        Ok(group)
    }

    pub async fn group(&self, id: &str) -> Result<EnrollmentGroup, AzureError> {
        self.store.group(id).await.map_err(store_err)?.ok_or_else(|| {
            AzureError::new(
                ErrorCode::EnrollmentGroupNotFound,
                format!("Enrollment group '{}' was not found.", printable(id)),
            )
        })
    }

    pub async fn groups(&self) -> Result<Vec<EnrollmentGroup>, AzureError> {
        self.store.groups().await.map_err(store_err)
    }

    pub async fn delete_group(&self, id: &str, if_match: Option<&str>) -> Result<(), AzureError> {
        let deleted = self.store.delete_group(id, if_match).await.map_err(store_err);
        self.invalidate_groups();
        if deleted? {
            tracing::info!(group = %printable(id), "enrollment group deleted");
            Ok(())
        } else {
            Err(AzureError::new(
                ErrorCode::EnrollmentGroupNotFound,
                format!("Enrollment group '{}' was not found.", printable(id)),
            ))
        }
    }

    pub async fn registration(&self, id: &str) -> Result<RegistrationRecord, AzureError> {
        self.store.registration(id).await.map_err(store_err)?.ok_or_else(|| {
            AzureError::new(ErrorCode::RegistrationNotFound, format!("Registration '{}' was not found.", printable(id)))
        })
    }

    pub async fn registrations_of_group(
        &self,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<RegistrationRecord>, AzureError> {
        self.store.registrations_of_group(group_id, offset, limit).await.map_err(store_err)
    }

    pub async fn delete_registration(&self, id: &str, if_match: Option<&str>) -> Result<(), AzureError> {
        if self.store.delete_registration(id, if_match).await.map_err(store_err)? {
            tracing::info!(registration_id = %printable(id), "registration record deleted");
            Ok(())
        } else {
            Err(AzureError::new(
                ErrorCode::RegistrationNotFound,
                format!("Registration '{}' was not found.", printable(id)),
            ))
        }
    }
}

impl Provisioning {
    pub async fn put_enrollment(
        &self,
        registration_id: &str,
        body: &[u8],
        if_match: Option<String>,
        create_only: bool,
    ) -> Result<IndividualEnrollment, AzureError> {
        let request = IndividualEnrollment::from_request_body(body)?;
        self.upsert_enrollment(registration_id, request, if_match, create_only).await
    }

    async fn upsert_enrollment(
        &self,
        registration_id: &str,
        request: IndividualEnrollment,
        if_match: Option<String>,
        create_only: bool,
    ) -> Result<IndividualEnrollment, AzureError> {
        let hubs = self.linked_hubs().await?;
        self.individual_enrollment_may_exist(registration_id);
        let path_id = registration_id.to_owned();
        let e = self
            .store
            .upsert_enrollment(
                registration_id,
                Box::new(move |current| {
                    if create_only && current.is_some() {
                        return Err(AzureError::new(
                            ErrorCode::Conflict,
                            "An enrollment with this registration id already exists.",
                        ));
                    }
                    if if_match.is_some() {
                        fleetgate_core::etag::check_if_match(
                            if_match.as_deref(),
                            current.and_then(|e| e.settings.etag.as_deref()),
                        )?;
                    }
                    request.prepare_upsert(&path_id, current, &hubs, Timestamp::now())
                }),
            )
            .await
            .map_err(store_err)?;
        tracing::info!(registration_id = %e.registration_id, status = ?e.settings.provisioning_status, "individual enrollment written");
        Ok(e)
    }

    /// An individual enrollment with its device's registration state filled in, as Azure shows it.
    pub async fn enrollment(&self, registration_id: &str) -> Result<IndividualEnrollment, AzureError> {
        let mut e = self.store.enrollment(registration_id).await.map_err(store_err)?.ok_or_else(|| {
            AzureError::new(
                ErrorCode::EnrollmentNotFound,
                format!("Enrollment '{}' was not found.", printable(registration_id)),
            )
        })?;
        if let Some(r) = self.store.registration(registration_id).await.map_err(store_err)? {
            if r.enrollment_group_id.is_none() {
                e.registration_state = serde_json::to_value(&r).ok();
            }
        }
        Ok(e)
    }

    pub async fn enrollments(&self, offset: usize, limit: usize) -> Result<Vec<IndividualEnrollment>, AzureError> {
        self.store.enrollments(offset, limit).await.map_err(store_err)
    }

    pub async fn delete_enrollment(&self, registration_id: &str, if_match: Option<&str>) -> Result<(), AzureError> {
        if self.store.delete_enrollment(registration_id, if_match).await.map_err(store_err)? {
            self.individual_enrollment_deleted(registration_id);
            tracing::info!(registration_id = %printable(registration_id), "individual enrollment deleted");
            Ok(())
        } else {
            Err(AzureError::new(
                ErrorCode::EnrollmentNotFound,
                format!("Enrollment '{}' was not found.", printable(registration_id)),
            ))
        }
    }

    /// Azure's bulk enrollment operation: up to 10 enrollments, each applied on its own; the
    /// answer lists the ones that failed.
    pub async fn bulk_enrollments(&self, body: &[u8]) -> Result<serde_json::Value, AzureError> {
        #[derive(serde::Deserialize)]
        struct Bulk {
            enrollments: Vec<serde_json::Value>,
            mode: String,
        }
        let bulk: Bulk = serde_json::from_slice(body)
            .map_err(|e| AzureError::bad_request(format!("Malformed bulk enrollment operation: {e}")))?;
        if bulk.enrollments.is_empty() || bulk.enrollments.len() > MAX_BULK {
            return Err(AzureError::bad_request(format!("A bulk operation takes 1 to {MAX_BULK} enrollments.")));
        }
        let mode = bulk.mode.to_ascii_lowercase();
        if !["create", "update", "updateifmatchetag", "delete"].contains(&mode.as_str()) {
            return Err(AzureError::bad_request("mode must be create, update, updateIfMatchETag or delete."));
        }
        let mut errors = Vec::new();
        for item in bulk.enrollments {
            let id = item.get("registrationId").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let etag = item.get("etag").and_then(|v| v.as_str()).map(str::to_owned);
            let result = match mode.as_str() {
                "delete" => self.delete_enrollment(&id, etag.as_deref()).await,
                _ => match serde_json::from_value::<IndividualEnrollment>(item) {
                    Ok(e) => {
                        let if_match = if mode == "updateifmatchetag" { etag.or(Some("\"\"".into())) } else { None };
                        self.upsert_enrollment(&id, e, if_match, mode == "create").await.map(|_| ())
                    }
                    Err(e) => Err(AzureError::bad_request(format!("Malformed enrollment: {e}"))),
                },
            };
            if let Err(e) = result {
                errors.push(serde_json::json!({
                    "registrationId": id,
                    "errorCode": e.code.code(),
                    "errorStatus": e.message,
                }));
            }
        }
        Ok(serde_json::json!({ "isSuccessful": errors.is_empty(), "errors": errors }))
    }
}

/// Azure's limit on enrollments per bulk operation.
const MAX_BULK: usize = 10;

/// An id from a URL, made safe to echo: bounded length, no control characters.
fn printable(s: &str) -> String {
    s.chars().take(140).map(|c| if c.is_control() { '?' } else { c }).collect()
}
