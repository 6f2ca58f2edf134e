//! Enrollment groups: the Azure `EnrollmentGroup` JSON shape and the rules for creating and
//! updating one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AzureError, ErrorCode};
use crate::ids::{EnrollmentGroupId, RegistrationId};
use crate::keys::SymmetricKey;
use crate::time::Timestamp;
use crate::x509::{Certificate, CertificateInfo};

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
    pub x509: Option<X509Attestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
}

/// Azure's `X509Attestation`: a group trusts CA certificates (`signingCertificates`, or
/// `caReferences`), an individual enrollment pins the device's own certificates
/// (`clientCertificates`) or trusts a CA (`caReferences`).
///
/// Fleetgate has no separate certificate store for `caReferences` to name, so a reference holds
/// the CA certificate itself (PEM or base64 DER).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CaReferences>,
}

/// Azure's `X509Certificates`: a primary and an optional secondary certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    #[serde(default)]
    pub primary: Option<X509CertificateWithInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
}

/// Azure's `X509CertificateWithInfo`: the certificate as given, and what the server read from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<CertificateInfo>,
}

/// Azure's `X509CAReferences`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509CaReferences {
    #[serde(default)]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

/// How an X.509 enrollment decides whether to trust a device's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum X509Trust {
    /// The device's own certificates, primary and secondary (individual enrollments).
    Pinned(Vec<Option<Certificate>>),
    /// CA certificates, primary and secondary: the device's chain must lead to one of them.
    CertificateAuthority(Vec<Option<Certificate>>),
}

/// Which kind of enrollment is being prepared: they accept different X.509 shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnrollmentKind {
    Group,
    Individual,
}

impl X509Attestation {
    /// The certificates this attestation trusts. Stored attestations always parse (they were
    /// checked when written); anything unreadable is left out.
    pub fn trust(&self) -> Option<X509Trust> {
        let pair = |c: &X509Certificates| {
            [&c.primary, &c.secondary]
                .into_iter()
                .map(|s| s.as_ref().and_then(|s| s.certificate.as_deref()).and_then(|t| Certificate::parse(t).ok()))
                .collect::<Vec<_>>()
        };
        if let Some(c) = &self.client_certificates {
            return Some(X509Trust::Pinned(pair(c)));
        }
        if let Some(c) = &self.signing_certificates {
            return Some(X509Trust::CertificateAuthority(pair(c)));
        }
        self.ca_references.as_ref().map(|r| {
            X509Trust::CertificateAuthority(
                [&r.primary, &r.secondary]
                    .into_iter()
                    .map(|t| t.as_deref().and_then(|t| Certificate::parse(t).ok()))
                    .collect(),
            )
        })
    }

    /// Validates a create-or-update: exactly one of the shapes the enrollment kind accepts,
    /// every certificate readable (PEM or base64 DER), CA certificates marked as CAs; fills in
    /// `info`. A slot given without its certificate (a client that did GET, then PUT, never saw
    /// it) keeps the stored one.
    fn prepare(&mut self, existing: Option<&X509Attestation>, kind: EnrollmentKind) -> Result<(), AzureError> {
        let bad = |m: String| Err(AzureError::bad_request(m));
        let shapes =
            [self.client_certificates.is_some(), self.signing_certificates.is_some(), self.ca_references.is_some()];
        if shapes.iter().filter(|s| **s).count() != 1 {
            return bad(
                "x509 attestation needs exactly one of clientCertificates, signingCertificates or caReferences.".into(),
            );
        }
        match kind {
            EnrollmentKind::Group if self.client_certificates.is_some() => {
                return bad(
                    "An enrollment group trusts CA certificates (signingCertificates or caReferences), not clientCertificates."
                        .into(),
                )
            }
            EnrollmentKind::Individual if self.signing_certificates.is_some() => {
                return bad(
                    "An individual enrollment takes the device's clientCertificates (or caReferences), not signingCertificates."
                        .into(),
                )
            }
            _ => {}
        }
        let must_be_ca = self.client_certificates.is_none();
        let check = |what: &str, text: &str| -> Result<Certificate, AzureError> {
            let cert = Certificate::parse(text)
                .map_err(|e| AzureError::bad_request(format!("The {what} certificate is invalid: {e}.")))?;
            if must_be_ca && !cert.is_ca() {
                return Err(AzureError::bad_request(format!(
                    "The {what} certificate is not a CA certificate (basic constraints CA:TRUE)."
                )));
            }
            Ok(cert)
        };
        if let Some(refs) = &mut self.ca_references {
            for (what, slot) in [("primary", &mut refs.primary), ("secondary", &mut refs.secondary)] {
                *slot = match slot.as_deref().filter(|s| !s.trim().is_empty()) {
                    Some(text) => Some(check(what, text)?.to_pem()),
                    None => None,
                };
            }
            if refs.primary.is_none() {
                return bad("caReferences needs a primary CA certificate.".into());
            }
            return Ok(());
        }
        let (given, kept) = match (&mut self.client_certificates, &mut self.signing_certificates) {
            (Some(c), _) => (c, existing.and_then(|e| e.client_certificates.clone())),
            (None, Some(c)) => (c, existing.and_then(|e| e.signing_certificates.clone())),
            (None, None) => unreachable!("one shape is present"),
        };
        let kept = kept.unwrap_or_default();
        for (what, slot, old) in
            [("primary", &mut given.primary, kept.primary), ("secondary", &mut given.secondary, kept.secondary)]
        {
            let text = slot.as_ref().and_then(|s| s.certificate.clone()).filter(|t| !t.trim().is_empty());
            // A slot sent back with its info but without its certificate keeps the stored one.
            let text = match (text, slot.is_some()) {
                (Some(t), _) => Some(t),
                (None, true) => old.and_then(|o| o.certificate),
                (None, false) => None,
            };
            *slot = match text {
                Some(t) => {
                    let cert = check(what, &t)?;
                    Some(X509CertificateWithInfo { certificate: Some(cert.to_pem()), info: Some(cert.info()) })
                }
                None => None,
            };
        }
        if given.primary.is_none() {
            return bad("x509 attestation needs a primary certificate.".into());
        }
        Ok(())
    }

    /// The view returned by GET and query: certificate info, not the certificates (as Azure).
    fn redact(&mut self) {
        for c in [&mut self.client_certificates, &mut self.signing_certificates].into_iter().flatten() {
            for slot in [&mut c.primary, &mut c.secondary].into_iter().flatten() {
                slot.certificate = None;
            }
        }
    }
}

/// What enrollment groups and individual enrollments have in common: how a device attests,
/// where it goes, what it starts with. Flattened into both JSON shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSettings {
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
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
}

/// Where a custom allocation webhook lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    pub webhook_url: String,
    pub api_version: String,
}

/// Azure's `EnrollmentGroup`, as stored and as returned by the service API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    #[serde(default)]
    pub enrollment_group_id: String,
    #[serde(flatten)]
    pub settings: EnrollmentSettings,
}

/// Azure's `IndividualEnrollment`: one device, by registration id. It takes precedence over any
/// group the device's key might also match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    #[serde(default)]
    pub registration_id: String,
    /// The hub device id to create; the registration id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    /// Read-only: the device's registration state, filled in on reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<Value>,
    #[serde(flatten)]
    pub settings: EnrollmentSettings,
}

impl EnrollmentSettings {
    /// Validates a create-or-update request and fills in the server-owned fields.
    ///
    /// `existing` are the stored settings of the same enrollment, if any: the creation time is
    /// kept and, when the request leaves the keys out (a client that did GET then PUT never saw
    /// them), its keys are kept rather than regenerated. Keys absent on create are generated.
    fn prepare(
        &mut self,
        existing: Option<&EnrollmentSettings>,
        linked_hubs: &[String],
        now: Timestamp,
        kind: EnrollmentKind,
    ) -> Result<(), AzureError> {
        match self.attestation.kind {
            AttestationType::SymmetricKey => {
                let requested = self.attestation.symmetric_key.take().unwrap_or_default();
                let kept = existing.and_then(|g| g.attestation.symmetric_key.clone()).unwrap_or_default();
                let pick = |given: Option<String>, old: Option<String>| -> Result<String, AzureError> {
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
            }
            AttestationType::X509 => {
                let mut x509 = self
                    .attestation
                    .x509
                    .take()
                    .ok_or_else(|| AzureError::bad_request("x509 attestation needs an x509 object."))?;
                let kept = existing.and_then(|e| e.attestation.x509.as_ref());
                x509.prepare(kept, kind)?;
                self.attestation.x509 = Some(x509);
                self.attestation.symmetric_key = None;
            }
            AttestationType::Tpm | AttestationType::None => {
                return Err(AzureError::bad_request("Fleetgate supports symmetricKey and x509 attestation."))
            }
        }
        self.attestation.tpm = None;

        match self.allocation_policy {
            Some(AllocationPolicy::Static) if self.iot_hub_host_name.is_none() => {
                return Err(AzureError::bad_request("The static allocation policy needs iotHubHostName."))
            }
            Some(AllocationPolicy::Custom) => {
                let Some(def) = &self.custom_allocation_definition else {
                    return Err(AzureError::bad_request(
                        "The custom allocation policy needs customAllocationDefinition.",
                    ));
                };
                if !(def.webhook_url.starts_with("https://") || def.webhook_url.starts_with("http://")) {
                    return Err(AzureError::bad_request(
                        "customAllocationDefinition.webhookUrl must be an http(s) URL.",
                    ));
                }
            }
            _ => {}
        }
        let is_linked = |h: &str| linked_hubs.iter().any(|l| l.eq_ignore_ascii_case(h));
        for hub in self.iot_hub_host_name.iter().chain(self.iot_hubs.iter().flatten()) {
            if !is_linked(hub) {
                return Err(AzureError::new(
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
        self.etag = Some(crate::etag::new_etag());
        Ok(())
    }

    fn redact(&mut self) {
        if let Some(k) = self.attestation.symmetric_key.as_mut() {
            *k = SymmetricKeyAttestation::default();
        }
        if let Some(x) = self.attestation.x509.as_mut() {
            x.redact();
        }
    }

    /// What an X.509 enrollment trusts; `None` for other attestation types.
    pub fn x509_trust(&self) -> Option<X509Trust> {
        match self.attestation.kind {
            AttestationType::X509 => self.attestation.x509.as_ref().and_then(X509Attestation::trust),
            _ => None,
        }
    }

    /// The enrollment's primary and secondary keys (both always present once stored).
    pub fn keys(&self) -> Vec<SymmetricKey> {
        let Some(sk) = &self.attestation.symmetric_key else { return Vec::new() };
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

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, AzureError> {
    serde_json::from_slice(body).map_err(|e| AzureError::bad_request(format!("Malformed {what} JSON: {e}")))
}

impl EnrollmentGroup {
    /// Parses a PUT body. Unknown fields are ignored, as Azure does.
    pub fn from_request_body(body: &[u8]) -> Result<Self, AzureError> {
        parse_body(body, "enrollment group")
    }

    /// Validates a create-or-update of group `path_id` against the stored one (see
    /// [`EnrollmentSettings`] for what is kept).
    pub fn prepare_upsert(
        mut self,
        path_id: &str,
        existing: Option<&EnrollmentGroup>,
        linked_hubs: &[String],
        now: Timestamp,
    ) -> Result<Self, AzureError> {
        let id = EnrollmentGroupId::parse(path_id)?;
        if !self.enrollment_group_id.is_empty() && !self.enrollment_group_id.eq_ignore_ascii_case(id.as_str()) {
            return Err(AzureError::bad_request("enrollmentGroupId in the body does not match the id in the path."));
        }
        self.enrollment_group_id =
            existing.map(|g| g.enrollment_group_id.clone()).unwrap_or_else(|| id.as_str().to_owned());
        self.settings.prepare(existing.map(|g| &g.settings), linked_hubs, now, EnrollmentKind::Group)?;
        Ok(self)
    }

    /// The view returned by GET and query: keys are left out (fetch them with the
    /// attestation-mechanism call), as Azure's service API does.
    pub fn redacted(&self) -> Self {
        let mut g = self.clone();
        g.settings.redact();
        g
    }

    pub fn keys(&self) -> Vec<SymmetricKey> {
        self.settings.keys()
    }

    pub fn is_enabled(&self) -> bool {
        self.settings.is_enabled()
    }
}

impl IndividualEnrollment {
    pub fn from_request_body(body: &[u8]) -> Result<Self, AzureError> {
        parse_body(body, "individual enrollment")
    }

    /// Validates a create-or-update of the enrollment for `path_id` (a registration id).
    pub fn prepare_upsert(
        mut self,
        path_id: &str,
        existing: Option<&IndividualEnrollment>,
        linked_hubs: &[String],
        now: Timestamp,
    ) -> Result<Self, AzureError> {
        let id = RegistrationId::parse(path_id)?;
        if !self.registration_id.is_empty() && !self.registration_id.eq_ignore_ascii_case(id.as_str()) {
            return Err(AzureError::bad_request("registrationId in the body does not match the id in the path."));
        }
        self.registration_id = existing.map(|e| e.registration_id.clone()).unwrap_or_else(|| id.as_str().to_owned());
        if let Some(d) = self.device_id.as_deref().filter(|d| !d.is_empty()) {
            RegistrationId::parse(d).map_err(|e| {
                AzureError::new(ErrorCode::InvalidId, e.message.replace("registration id", "device id"))
            })?;
        } else {
            self.device_id = None;
        }
        self.registration_state = None;
        self.settings.prepare(existing.map(|e| &e.settings), linked_hubs, now, EnrollmentKind::Individual)?;
        Ok(self)
    }

    pub fn redacted(&self) -> Self {
        let mut e = self.clone();
        e.settings.redact();
        e
    }

    pub fn keys(&self) -> Vec<SymmetricKey> {
        self.settings.keys()
    }
}

/// `initialTwin` must be `{ "tags": {...}, "properties": { "desired": {...} } }` (both optional).
fn validate_initial_twin(twin: &Value) -> Result<(), AzureError> {
    let bad = |why: &str| Err(AzureError::bad_request(format!("Invalid initialTwin: {why}.")));
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
        assert!(g.settings.etag.as_deref().unwrap().starts_with('"'));
        assert_eq!(g.settings.provisioning_status, ProvisioningStatus::Enabled);
        assert_eq!(g.settings.created_date_time_utc.as_deref(), Some("1970-01-01T00:00:00.0000000Z"));
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
        assert_eq!(g2.settings.created_date_time_utc, g1.settings.created_date_time_utc);
        assert_ne!(g2.settings.etag, g1.settings.etag);
        assert!(!g2.is_enabled());
        assert_eq!(g2.enrollment_group_id, "grp-1");
    }

    #[test]
    fn bad_requests() {
        let t = Timestamp::from_unix_seconds(0);
        let cases = [
            (r#"{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"short"}}}"#, "grp", 400),
            (r#"{"attestation":{"type":"tpm"}}"#, "grp", 400),
            (r#"{"attestation":{"type":"x509"}}"#, "grp", 400),
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
    fn x509_groups_take_ca_certificates_and_fill_in_info() {
        use crate::x509::tests::{ca, leaf};
        let t = Timestamp::from_unix_seconds(0);
        let root = ca("root");
        let body = json_body(&serde_json::json!({"attestation": {"type": "x509", "x509": {
            "signingCertificates": {"primary": {"certificate": root.pem()}}}}}));
        let g = EnrollmentGroup::from_request_body(&body).unwrap().prepare_upsert("g", None, &hubs(), t).unwrap();
        let info = &g.settings.attestation.x509.as_ref().unwrap().signing_certificates.as_ref().unwrap().primary;
        assert_eq!(info.as_ref().unwrap().info.as_ref().unwrap().subject_name, "CN=root");
        assert!(g.keys().is_empty());
        assert!(
            matches!(g.settings.x509_trust(), Some(X509Trust::CertificateAuthority(c)) if c[0].is_some() && c[1].is_none())
        );
        // Reads leave the certificate out; a PUT of what was read keeps it.
        let read = serde_json::to_vec(&g.redacted()).unwrap();
        assert!(!String::from_utf8_lossy(&read).contains("BEGIN CERTIFICATE"));
        let g2 = EnrollmentGroup::from_request_body(&read).unwrap().prepare_upsert("g", Some(&g), &hubs(), t).unwrap();
        assert_eq!(g2.settings.x509_trust(), g.settings.x509_trust());
        // base64 DER in caReferences works too.
        let der = crate::x509::Certificate::parse(&root.pem()).unwrap().to_base64();
        let body = json_body(
            &serde_json::json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": der}}}}),
        );
        let g3 = EnrollmentGroup::from_request_body(&body).unwrap().prepare_upsert("g3", None, &hubs(), t).unwrap();
        assert_eq!(g3.settings.x509_trust(), g.settings.x509_trust());

        let dev = leaf("dev-1", &root);
        let bad = [
            // A device certificate is not a CA.
            serde_json::json!({"signingCertificates": {"primary": {"certificate": dev.pem()}}}),
            serde_json::json!({"clientCertificates": {"primary": {"certificate": dev.pem()}}}),
            serde_json::json!({"signingCertificates": {"primary": {"certificate": "garbage"}}}),
            serde_json::json!({"signingCertificates": {"secondary": {"certificate": root.pem()}}}),
            serde_json::json!({}),
        ];
        for x in bad {
            let body = json_body(&serde_json::json!({"attestation": {"type": "x509", "x509": x}}));
            let e = EnrollmentGroup::from_request_body(&body).unwrap().prepare_upsert("g", None, &hubs(), t);
            assert_eq!(e.unwrap_err().status(), 400, "{x}");
        }
    }

    #[test]
    fn x509_individual_enrollments_pin_the_device_certificate() {
        use crate::x509::tests::{ca, leaf};
        let t = Timestamp::from_unix_seconds(0);
        let root = ca("root");
        let (a, b) = (leaf("dev-1", &root), leaf("dev-1", &root));
        let body = json_body(&serde_json::json!({"registrationId": "dev-1", "attestation": {"type": "x509", "x509": {
            "clientCertificates": {"primary": {"certificate": a.pem()}, "secondary": {"certificate": b.pem()}}}}}));
        let e =
            IndividualEnrollment::from_request_body(&body).unwrap().prepare_upsert("dev-1", None, &hubs(), t).unwrap();
        match e.settings.x509_trust() {
            Some(X509Trust::Pinned(c)) => {
                assert_eq!(c[0].as_ref().unwrap().der(), a.cert.der().as_ref());
                assert_eq!(c[1].as_ref().unwrap().der(), b.cert.der().as_ref());
            }
            other => panic!("{other:?}"),
        }
        let body = json_body(&serde_json::json!({"registrationId": "dev-1", "attestation": {"type": "x509", "x509": {
            "signingCertificates": {"primary": {"certificate": root.pem()}}}}}));
        let err = IndividualEnrollment::from_request_body(&body).unwrap().prepare_upsert("dev-1", None, &hubs(), t);
        assert_eq!(err.unwrap_err().status(), 400);
    }

    fn json_body(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }
}
