//! Device identities in a hub's registry, as created when DPS assigns a device.

use serde::{Deserialize, Serialize};

use crate::keys::SymmetricKey;
use crate::time::Timestamp;
use crate::x509::{
    check_leaf, match_thumbprint, require_common_name, verify_chain, Certificate, CertificateChain, CertificateRefusal,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum DeviceStatus {
    #[default]
    Enabled,
    Disabled,
}

/// How a device authenticates to the hub (Azure's `authentication.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum AuthenticationType {
    /// A SAS token signed with the primary or secondary key.
    #[default]
    Sas,
    /// A client certificate whose thumbprint is the primary or secondary thumbprint.
    SelfSigned,
    /// A client certificate chain leading to one of the identity's CA certificates, with the
    /// device id as the leaf's common name.
    CertificateAuthority,
    /// No credentials at this scope (Azure's `none`): the identity exists in the registry (its
    /// twin, its C2D queue) but cannot open a connection of its own with SAS or X.509.
    None,
}

/// A hub device identity. Keys are the derived device keys; `Debug` never shows them. X.509
/// identities have no keys (empty strings) and record their thumbprints or CA certificates.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    pub hub: String,
    pub device_id: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub status: DeviceStatus,
    /// Why the status is what it is (Azure's `statusReason`, up to 128 characters), as the
    /// service last set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub etag: String,
    pub generation_id: String,
    pub created_date_time_utc: String,
    /// Absent in identities stored before X.509 existed: those are SAS.
    #[serde(default)]
    pub authentication_type: AuthenticationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_thumbprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_thumbprint: Option<String>,
    /// `certificateAuthority`: the CA certificates (base64 DER) the device's chain must lead to,
    /// copied from its enrollment group at assignment (as an Azure hub holds its own verified
    /// CAs, independent of DPS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates: Vec<String>,
}

/// What a device identity authenticates with.
#[derive(Clone, PartialEq, Eq)]
pub enum DeviceCredentials {
    /// Primary and secondary symmetric keys (the first is used for both when only one is given).
    Keys(Vec<SymmetricKey>),
    /// Primary and secondary certificate thumbprints (upper-case hex).
    SelfSigned { primary: Option<String>, secondary: Option<String> },
    /// CA certificates (base64 DER).
    CertificateAuthority(Vec<String>),
    /// None: the identity cannot authenticate by itself.
    None,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("hub", &self.hub)
            .field("device_id", &self.device_id)
            .field("status", &self.status)
            .field("authentication_type", &self.authentication_type)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// The identity DPS creates at assignment, or the existing one refreshed with the current
    /// derived keys (a group key roll must reach the hub). Status and generation are kept.
    pub fn provisioned(
        existing: Option<&DeviceIdentity>,
        hub: &str,
        device_id: &str,
        keys: &[SymmetricKey],
        now: Timestamp,
    ) -> Self {
        Self::provisioned_with(existing, hub, device_id, DeviceCredentials::Keys(keys.to_vec()), now)
    }

    /// Like [`DeviceIdentity::provisioned`], with any kind of credentials: the identity's
    /// authentication type follows them (an X.509 device has no keys).
    pub fn provisioned_with(
        existing: Option<&DeviceIdentity>,
        hub: &str,
        device_id: &str,
        credentials: DeviceCredentials,
        now: Timestamp,
    ) -> Self {
        let (mut primary_key, mut secondary_key) = (String::new(), String::new());
        let (mut primary_thumbprint, mut secondary_thumbprint, mut ca_certificates) = (None, None, Vec::new());
        let authentication_type = match credentials {
            DeviceCredentials::Keys(keys) => {
                let key = |i: usize| keys.get(i).or(keys.first()).map(SymmetricKey::to_base64).unwrap_or_default();
                (primary_key, secondary_key) = (key(0), key(1));
                AuthenticationType::Sas
            }
            DeviceCredentials::SelfSigned { primary, secondary } => {
                (primary_thumbprint, secondary_thumbprint) = (primary, secondary);
                AuthenticationType::SelfSigned
            }
            DeviceCredentials::CertificateAuthority(cas) => {
                ca_certificates = cas;
                AuthenticationType::CertificateAuthority
            }
            DeviceCredentials::None => AuthenticationType::None,
        };
        DeviceIdentity {
            hub: hub.to_owned(),
            device_id: existing.map(|d| d.device_id.clone()).unwrap_or_else(|| device_id.to_owned()),
            primary_key,
            secondary_key,
            authentication_type,
            primary_thumbprint,
            secondary_thumbprint,
            ca_certificates,
            status: existing.map(|d| d.status).unwrap_or_default(),
            status_reason: existing.and_then(|d| d.status_reason.clone()),
            etag: crate::registration::new_registration_etag(),
            generation_id: existing
                .map(|d| d.generation_id.clone())
                .unwrap_or_else(|| format!("{}", 638_000_000_000_000_000u64 + rand::random::<u32>() as u64)),
            created_date_time_utc: existing
                .map(|d| d.created_date_time_utc.clone())
                .unwrap_or_else(|| now.to_azure_string()),
        }
    }
}

impl DeviceIdentity {
    /// Whether `other` authenticates with exactly what this identity does: same type, keys,
    /// thumbprints and CA certificates. When it does not, a connection opened with the old
    /// credentials must not outlive the change.
    pub fn same_credentials(&self, other: &DeviceIdentity) -> bool {
        self.authentication_type == other.authentication_type
            && self.primary_key == other.primary_key
            && self.secondary_key == other.secondary_key
            && self.primary_thumbprint == other.primary_thumbprint
            && self.secondary_thumbprint == other.secondary_thumbprint
            && self.ca_certificates == other.ca_certificates
    }

    /// Checks the TLS client certificate chain of a device whose identity is X.509: the leaf
    /// must be valid and usable for client authentication, and either have one of the
    /// identity's thumbprints (`selfSigned`) or name the device id as its common name and chain
    /// to one of `cas` (`certificateAuthority`; the identity's own CA certificates, else those
    /// the caller trusts for the hub).
    pub fn check_certificate(
        &self,
        chain: Option<&CertificateChain>,
        fallback_cas: &[Certificate],
        now: i64,
    ) -> Result<(), CertificateRefusal> {
        let chain = chain.ok_or(CertificateRefusal::NoCertificate)?;
        let leaf = check_leaf(chain, now)?;
        match self.authentication_type {
            AuthenticationType::Sas | AuthenticationType::None => Err(CertificateRefusal::UnknownCertificate),
            AuthenticationType::SelfSigned => {
                let thumbprints = [self.primary_thumbprint.as_deref(), self.secondary_thumbprint.as_deref()];
                match_thumbprint(&leaf, &thumbprints).map(|_| ()).ok_or(CertificateRefusal::UnknownCertificate)
            }
            AuthenticationType::CertificateAuthority => {
                require_common_name(&leaf, &self.device_id)?;
                let own: Vec<Certificate> =
                    self.ca_certificates.iter().filter_map(|c| Certificate::parse(c).ok()).collect();
                let cas = if own.is_empty() { fallback_cas } else { &own };
                verify_chain(chain, cas, now).map(|_| ())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_stored_before_x509_are_sas_and_x509_identities_have_no_keys() {
        let old = r#"{"hub":"h","deviceId":"d","primaryKey":"a2V5","secondaryKey":"a2V5","status":"enabled",
            "etag":"e","generationId":"1","createdDateTimeUtc":"t"}"#;
        let d: DeviceIdentity = serde_json::from_str(old).unwrap();
        assert_eq!(d.authentication_type, AuthenticationType::Sas);
        let now = Timestamp::from_unix_seconds(0);
        let ss = DeviceIdentity::provisioned_with(
            Some(&d),
            "h",
            "d",
            DeviceCredentials::SelfSigned { primary: Some("AB".into()), secondary: None },
            now,
        );
        assert_eq!((ss.authentication_type, ss.primary_key.as_str()), (AuthenticationType::SelfSigned, ""));
        assert_eq!(ss.primary_thumbprint.as_deref(), Some("AB"));
        assert_eq!(ss.generation_id, d.generation_id);
        let json = serde_json::to_value(&ss).unwrap();
        assert_eq!(json["authenticationType"], "selfSigned");
        let ca = DeviceIdentity::provisioned_with(
            None,
            "h",
            "d",
            DeviceCredentials::CertificateAuthority(vec!["x".into()]),
            now,
        );
        assert_eq!(ca.authentication_type, AuthenticationType::CertificateAuthority);
        // Back to keys: the X.509 fields go.
        let k = DeviceIdentity::provisioned(Some(&ca), "h", "d", &[SymmetricKey::generate()], now);
        assert_eq!((k.authentication_type, k.ca_certificates.len()), (AuthenticationType::Sas, 0));
        assert_eq!(k.primary_key, k.secondary_key);
    }

    #[test]
    fn credential_changes_are_told_from_other_updates() {
        let now = Timestamp::now();
        let (k1, k2) = (SymmetricKey::generate(), SymmetricKey::generate());
        let dev = DeviceIdentity::provisioned(None, "h", "d", &[k1.clone(), k2.clone()], now);
        let mut disabled = DeviceIdentity::provisioned(Some(&dev), "h", "d", &[k1.clone(), k2.clone()], now);
        disabled.status = DeviceStatus::Disabled;
        assert!(dev.same_credentials(&disabled), "a new etag or status is not a credential change");
        let rolled = DeviceIdentity::provisioned(Some(&dev), "h", "d", &[k1.clone(), SymmetricKey::generate()], now);
        assert!(!dev.same_credentials(&rolled), "secondary key regenerated");
        let thumb = |t: &str| DeviceCredentials::SelfSigned { primary: Some(t.into()), secondary: None };
        let ss = DeviceIdentity::provisioned_with(Some(&dev), "h", "d", thumb("AB"), now);
        assert!(!dev.same_credentials(&ss), "keys to X.509");
        assert!(ss.same_credentials(&DeviceIdentity::provisioned_with(Some(&ss), "h", "d", thumb("AB"), now)));
        assert!(!ss.same_credentials(&DeviceIdentity::provisioned_with(Some(&ss), "h", "d", thumb("CD"), now)));
    }

    #[test]
    fn x509_identities_check_thumbprints_or_the_chain_to_their_ca() {
        use crate::x509::tests::{ca, chain, leaf, AsCertificate};
        let now = Timestamp::now();
        let (root, other_root) = (ca("root"), ca("other"));
        let dev = leaf("dev-1", &root);
        let presented = chain(&[&dev]);
        let pinned = DeviceIdentity::provisioned_with(
            None,
            "h",
            "dev-1",
            DeviceCredentials::SelfSigned { primary: None, secondary: Some(dev.certificate().sha1_thumbprint()) },
            now,
        );
        let t = now.unix_seconds();
        assert!(pinned.check_certificate(Some(&presented), &[], t).is_ok());
        assert_eq!(pinned.check_certificate(None, &[], t), Err(CertificateRefusal::NoCertificate));
        let stranger = chain(&[&leaf("dev-1", &root)]);
        assert_eq!(pinned.check_certificate(Some(&stranger), &[], t), Err(CertificateRefusal::UnknownCertificate));

        let by_ca = DeviceIdentity::provisioned_with(
            None,
            "h",
            "dev-1",
            DeviceCredentials::CertificateAuthority(vec![root.certificate().to_base64()]),
            now,
        );
        assert!(by_ca.check_certificate(Some(&presented), &[], t).is_ok());
        assert!(by_ca.check_certificate(Some(&stranger), &[], t).is_ok());
        // Another CA's device with the same name, or another name under the right CA: refused.
        let foreign = chain(&[&leaf("dev-1", &other_root)]);
        assert!(matches!(by_ca.check_certificate(Some(&foreign), &[], t), Err(CertificateRefusal::UnknownCa(_))));
        let renamed = chain(&[&leaf("dev-2", &root)]);
        assert!(matches!(
            by_ca.check_certificate(Some(&renamed), &[], t),
            Err(CertificateRefusal::CommonNameMismatch { .. })
        ));
        // Without CA certificates of its own, the caller's are used.
        let manual =
            DeviceIdentity::provisioned_with(None, "h", "dev-1", DeviceCredentials::CertificateAuthority(vec![]), now);
        assert!(manual.check_certificate(Some(&presented), &[], t).is_err());
        assert!(manual.check_certificate(Some(&presented), &[root.certificate()], t).is_ok());
        let sas = DeviceIdentity::provisioned(None, "h", "dev-1", &[SymmetricKey::generate()], now);
        assert!(sas.check_certificate(Some(&presented), &[root.certificate()], t).is_err());
    }
}
