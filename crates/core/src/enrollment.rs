//! Enrollment groups: the Azure `EnrollmentGroup` JSON shape and the rules for creating and
//! updating one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{DpsError, ErrorCode};
use crate::ids::EnrollmentGroupId;
use crate::keys::SymmetricKey;
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    #[default]
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AllocationPolicy {
    Hashed,
    GeoLatency,
    Static,
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    pub update_hub_assignment: bool,
    pub migrate_device_data: bool,
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        Self { update_hub_assignment: true, migrate_device_data: true }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationType {
    None,
    Tpm,
    X509,
    SymmetricKey,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

impl std::fmt::Debug for SymmetricKeyAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKeyAttestation(<redacted>)")
    }
}

/// Azure's `AttestationMechanism`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    #[serde(rename = "type")]
    pub kind: AttestationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
}

/// Azure's `EnrollmentGroup`, as stored and as returned by the service API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    #[serde(default)]
    pub enrollment_group_id: String,
    pub attestation: AttestationMechanism,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default)]
    pub provisioning_status: ProvisioningStatus,
    #[serde(default)]
    pub reprovision_policy: ReprovisionPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<Value>,
}

/// A new opaque etag in the quoted form Azure uses (`"\"…\""`).
pub fn new_etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4())
}

/// `If-Match` semantics: absent or `*` always match an existing resource; otherwise the etags
/// must be equal, ignoring surrounding quotes (clients differ in whether they keep them).
pub fn check_if_match(if_match: Option<&str>, current: Option<&str>) -> Result<(), DpsError> {
    let Some(wanted) = if_match.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
    let ok = match current {
        Some(cur) => wanted == "*" || unquote(wanted) == unquote(cur),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(DpsError::new(
            ErrorCode::PreconditionFailed,
            "The ETag in the request does not match the current resource (precondition failed).",
        ))
    }
}

impl EnrollmentGroup {
    /// Parses a PUT body. Unknown fields are ignored, as Azure does.
    pub fn from_request_body(body: &[u8]) -> Result<Self, DpsError> {
        serde_json::from_slice(body).map_err(|e| DpsError::bad_request(format!("Malformed enrollment group JSON: {e}")))
    }

    /// Validates a create-or-update request and fills in the server-owned fields.
    ///
    /// `existing` is the stored group with the same id, if any: its creation time is kept and,
    /// when the request leaves the keys out (a client that did GET then PUT never saw them), its
    /// keys are kept rather than regenerated. Keys that are absent on create are generated.
    pub fn prepare_upsert(
        mut self,
        path_id: &str,
        existing: Option<&EnrollmentGroup>,
        linked_hubs: &[String],
        now: Timestamp,
    ) -> Result<Self, DpsError> {
        let id = EnrollmentGroupId::parse(path_id)?;
        if !self.enrollment_group_id.is_empty() && !self.enrollment_group_id.eq_ignore_ascii_case(id.as_str()) {
            return Err(DpsError::bad_request("enrollmentGroupId in the body does not match the id in the path."));
        }
        self.enrollment_group_id =
            existing.map(|g| g.enrollment_group_id.clone()).unwrap_or_else(|| id.as_str().to_owned());

        match self.attestation.kind {
            AttestationType::SymmetricKey => {}
            AttestationType::X509 => {
                return Err(DpsError::bad_request("X.509 attestation is not supported by this Fleetgate version yet."))
            }
            AttestationType::Tpm | AttestationType::None => {
                return Err(DpsError::bad_request("Enrollment groups support symmetricKey or x509 attestation."))
            }
        }
        let requested = self.attestation.symmetric_key.take().unwrap_or_default();
        let kept = existing.and_then(|g| g.attestation.symmetric_key.clone()).unwrap_or_default();
        let pick = |given: Option<String>, old: Option<String>| -> Result<String, DpsError> {
            match given.filter(|s| !s.trim().is_empty()) {
                Some(k) => Ok(SymmetricKey::parse_user_key(&k)?.to_base64()),
                None => Ok(old.unwrap_or_else(|| SymmetricKey::generate().to_base64())),
            }
        };
        self.attestation.symmetric_key = Some(SymmetricKeyAttestation {
            primary_key: Some(pick(requested.primary_key, kept.primary_key)?),
            secondary_key: Some(pick(requested.secondary_key, kept.secondary_key)?),
        });
        self.attestation.x509 = None;
        self.attestation.tpm = None;

        match self.allocation_policy {
            Some(AllocationPolicy::GeoLatency) | Some(AllocationPolicy::Custom) => {
                return Err(DpsError::bad_request(
                    "Allocation policies geoLatency and custom are not supported by this Fleetgate version yet; use static or hashed.",
                ))
            }
            Some(AllocationPolicy::Static) if self.iot_hub_host_name.is_none() => {
                return Err(DpsError::bad_request("The static allocation policy needs iotHubHostName."))
            }
            _ => {}
        }
        let is_linked = |h: &str| linked_hubs.iter().any(|l| l.eq_ignore_ascii_case(h));
        for hub in self.iot_hub_host_name.iter().chain(self.iot_hubs.iter().flatten()) {
            if !is_linked(hub) {
                return Err(DpsError::new(
                    ErrorCode::HubNotLinked,
                    format!("IoT hub '{hub}' is not linked to this provisioning service."),
                ));
            }
        }
        if let Some(twin) = &self.initial_twin {
            validate_initial_twin(twin)?;
            crate::twin::Twin::from_initial(Some(twin))?;
        }

        let now_s = now.to_azure_string();
        self.created_date_time_utc =
            Some(existing.and_then(|g| g.created_date_time_utc.clone()).unwrap_or_else(|| now_s.clone()));
        self.last_updated_date_time_utc = Some(now_s);
        self.etag = Some(new_etag());
        Ok(self)
    }

    /// The view returned by GET and query: keys are left out (fetch them with the
    /// attestation-mechanism call), as Azure's service API does.
    pub fn redacted(&self) -> Self {
        let mut g = self.clone();
        if let Some(k) = g.attestation.symmetric_key.as_mut() {
            *k = SymmetricKeyAttestation::default();
        }
        g
    }

    /// The group's primary and secondary keys (both always present once stored).
    pub fn keys(&self) -> Vec<SymmetricKey> {
        let Some(sk) = &self.attestation.symmetric_key else {
            return Vec::new();
        };
        [&sk.primary_key, &sk.secondary_key]
            .into_iter()
            .flatten()
            .filter_map(|k| SymmetricKey::from_base64(k).ok())
            .collect()
    }

    pub fn is_enabled(&self) -> bool {
        self.provisioning_status == ProvisioningStatus::Enabled
    }
}

/// `initialTwin` must be `{ "tags": {...}, "properties": { "desired": {...} } }` (both optional).
fn validate_initial_twin(twin: &Value) -> Result<(), DpsError> {
    let bad = |why: &str| Err(DpsError::bad_request(format!("Invalid initialTwin: {why}.")));
    let Some(obj) = twin.as_object() else {
        return bad("it must be a JSON object");
    };
    for (k, v) in obj {
        match k.as_str() {
            "tags" if v.is_object() || v.is_null() => {}
            "properties" => {
                let Some(p) = v.as_object() else {
                    return bad("properties must be an object");
                };
                for (pk, pv) in p {
                    if pk != "desired" || !(pv.is_object() || pv.is_null()) {
                        return bad("properties may only hold a 'desired' object");
                    }
                }
            }
            other => return bad(&format!("unexpected member '{other}'")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubs() -> Vec<String> {
        vec!["localhost".into()]
    }

    fn body(json: &str) -> EnrollmentGroup {
        EnrollmentGroup::from_request_body(json.as_bytes()).unwrap()
    }

    #[test]
    fn create_generates_keys_and_server_fields() {
        let g = body(r#"{"attestation":{"type":"symmetricKey"}}"#)
            .prepare_upsert("grp-1", None, &hubs(), Timestamp::from_unix_seconds(0))
            .unwrap();
        assert_eq!(g.enrollment_group_id, "grp-1");
        assert_eq!(g.keys().len(), 2);
        assert!(g.keys().iter().all(|k| k.as_bytes().len() == 64));
        assert!(g.etag.as_deref().unwrap().starts_with('"'));
        assert_eq!(g.provisioning_status, ProvisioningStatus::Enabled);
        assert_eq!(g.created_date_time_utc.as_deref(), Some("1970-01-01T00:00:00.0000000Z"));
        let json = serde_json::to_value(&g).unwrap();
        assert_eq!(json["attestation"]["type"], "symmetricKey");
        assert_eq!(json["reprovisionPolicy"]["updateHubAssignment"], true);
    }

    #[test]
    fn update_without_keys_keeps_them_and_created_time() {
        let g1 = body(r#"{"attestation":{"type":"symmetricKey"}}"#)
            .prepare_upsert("grp-1", None, &hubs(), Timestamp::from_unix_seconds(0))
            .unwrap();
        let g2 = body(r#"{"enrollmentGroupId":"GRP-1","attestation":{"type":"symmetricKey","symmetricKey":{}},"provisioningStatus":"disabled"}"#)
            .prepare_upsert("grp-1", Some(&g1), &hubs(), Timestamp::from_unix_seconds(10))
            .unwrap();
        assert_eq!(g2.keys(), g1.keys());
        assert_eq!(g2.created_date_time_utc, g1.created_date_time_utc);
        assert_ne!(g2.etag, g1.etag);
        assert!(!g2.is_enabled());
        assert_eq!(g2.enrollment_group_id, "grp-1");
    }

    #[test]
    fn bad_requests() {
        let t = Timestamp::from_unix_seconds(0);
        let cases = [
            (r#"{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"short"}}}"#, "grp", 400),
            (r#"{"attestation":{"type":"tpm"}}"#, "grp", 400),
            (r#"{"enrollmentGroupId":"other","attestation":{"type":"symmetricKey"}}"#, "grp", 400),
            (r#"{"attestation":{"type":"symmetricKey"},"iotHubHostName":"elsewhere"}"#, "grp", 400),
            (r#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"static"}"#, "grp", 400),
            (r#"{"attestation":{"type":"symmetricKey"},"initialTwin":{"properties":{"reported":{}}}}"#, "grp", 400),
            (r#"{"attestation":{"type":"symmetricKey"}}"#, "bad id!", 400),
        ];
        for (json, id, status) in cases {
            let e = body(json).prepare_upsert(id, None, &hubs(), t).unwrap_err();
            assert_eq!(e.status(), status, "{json}");
        }
        assert!(EnrollmentGroup::from_request_body(b"{not json").is_err());
        assert!(EnrollmentGroup::from_request_body(br#"{"attestation":{"type":"magic"}}"#).is_err());
        assert!(EnrollmentGroup::from_request_body(b"{}").is_err());
    }

    #[test]
    fn redaction_hides_keys() {
        let g = body(r#"{"attestation":{"type":"symmetricKey"}}"#)
            .prepare_upsert("g", None, &hubs(), Timestamp::from_unix_seconds(0))
            .unwrap();
        let s = serde_json::to_string(&g.redacted()).unwrap();
        for k in g.keys() {
            assert!(!s.contains(&k.to_base64()));
        }
        assert!(!format!("{g:?}").contains(&g.keys()[0].to_base64()));
    }

    #[test]
    fn if_match_rules() {
        assert!(check_if_match(None, None).is_ok());
        assert!(check_if_match(Some("*"), Some("\"a\"")).is_ok());
        assert!(check_if_match(Some("\"a\""), Some("\"a\"")).is_ok());
        assert!(check_if_match(Some("a"), Some("\"a\"")).is_ok());
        assert_eq!(check_if_match(Some("\"b\""), Some("\"a\"")).unwrap_err().status(), 412);
        assert_eq!(check_if_match(Some("\"b\""), None).unwrap_err().status(), 412);
    }
}
