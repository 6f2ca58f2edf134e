//! Shared access policies: named key pairs with rights, as Azure's DPS and IoT Hub have them.
//! A service API request carries a SAS token naming a policy (`skn`); the call goes through only
//! if the token is signed with one of that policy's keys and the policy has a right the call needs.

use serde::{Deserialize, Serialize};

use crate::keys::SymmetricKey;
use crate::sas::SasToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Right {
    // DPS
    ServiceConfig,
    EnrollmentRead,
    EnrollmentWrite,
    RegistrationStatusRead,
    RegistrationStatusWrite,
    // IoT Hub
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Vec<Right>,
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("key_name", &self.key_name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

impl AccessPolicy {
    pub fn new(name: &str, rights: &[Right]) -> Self {
        Self {
            key_name: name.to_owned(),
            primary_key: SymmetricKey::generate().to_base64(),
            secondary_key: SymmetricKey::generate().to_base64(),
            rights: rights.to_vec(),
        }
    }

    fn keys(&self) -> impl Iterator<Item = SymmetricKey> + '_ {
        [&self.primary_key, &self.secondary_key].into_iter().filter_map(|k| SymmetricKey::from_base64(k).ok())
    }
}

/// The policies a new DPS instance gets: Azure's `provisioningserviceowner`, plus one per right
/// so that tools can be given only what they need.
pub fn default_dps_policies() -> Vec<AccessPolicy> {
    use Right::*;
    vec![
        AccessPolicy::new(
            "provisioningserviceowner",
            &[ServiceConfig, EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite],
        ),
        AccessPolicy::new("enrollmentread", &[EnrollmentRead]),
        AccessPolicy::new("enrollmentwrite", &[EnrollmentRead, EnrollmentWrite]),
        AccessPolicy::new("registrationstatusread", &[RegistrationStatusRead]),
        AccessPolicy::new("registrationstatuswrite", &[RegistrationStatusRead, RegistrationStatusWrite]),
    ]
}

/// The policies every IoT hub has in Azure.
pub fn default_hub_policies() -> Vec<AccessPolicy> {
    use Right::*;
    vec![
        AccessPolicy::new("iothubowner", &[RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect]),
        AccessPolicy::new("service", &[ServiceConnect]),
        AccessPolicy::new("device", &[DeviceConnect]),
        AccessPolicy::new("registryRead", &[RegistryRead]),
        AccessPolicy::new("registryReadWrite", &[RegistryRead, RegistryWrite]),
    ]
}

/// Why a service request was refused; all are answered 401, the reason is for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("token names no policy (skn)")]
    NoPolicyName,
    #[error("unknown policy")]
    UnknownPolicy,
    #[error("signature does not match the policy's keys")]
    BadSignature,
    #[error("the policy lacks the right this call needs")]
    MissingRight,
}

/// The policy that signed `token` if it has one of `needed` (an empty `needed` accepts any).
pub fn authorize<'a>(
    policies: &'a [AccessPolicy],
    token: &SasToken,
    needed: &[Right],
) -> Result<&'a AccessPolicy, PolicyError> {
    let name = token.key_name.as_deref().ok_or(PolicyError::NoPolicyName)?;
    let policy = policies.iter().find(|p| p.key_name.eq_ignore_ascii_case(name)).ok_or(PolicyError::UnknownPolicy)?;
    if !policy.keys().any(|k| token.signed_with(&k)) {
        return Err(PolicyError::BadSignature);
    }
    if !needed.is_empty() && !needed.iter().any(|r| policy.rights.contains(r)) {
        return Err(PolicyError::MissingRight);
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sas::build_token;

    fn token(p: &AccessPolicy, secondary: bool) -> SasToken {
        let key = SymmetricKey::from_base64(if secondary { &p.secondary_key } else { &p.primary_key }).unwrap();
        SasToken::parse(&build_token(&key, "h", 9_999_999_999, Some(&p.key_name))).unwrap()
    }

    #[test]
    fn rights_and_keys() {
        let ps = default_dps_policies();
        let read = &ps[1];
        assert_eq!(authorize(&ps, &token(read, false), &[Right::EnrollmentRead]).unwrap().key_name, "enrollmentread");
        assert_eq!(authorize(&ps, &token(read, true), &[Right::EnrollmentRead]).unwrap().key_name, "enrollmentread");
        assert_eq!(
            authorize(&ps, &token(read, false), &[Right::EnrollmentWrite]).unwrap_err(),
            PolicyError::MissingRight
        );
        let mut forged = read.clone();
        forged.primary_key = SymmetricKey::generate().to_base64();
        assert_eq!(authorize(&ps, &token(&forged, false), &[]).unwrap_err(), PolicyError::BadSignature);
        let hub = default_hub_policies();
        assert_eq!(authorize(&hub, &token(read, false), &[]).unwrap_err(), PolicyError::UnknownPolicy);
        let device = &hub[2];
        assert_eq!(
            authorize(&hub, &token(device, false), &[Right::RegistryRead, Right::ServiceConnect]).unwrap_err(),
            PolicyError::MissingRight
        );
        assert!(!format!("{device:?}").contains(&device.primary_key));
    }
}
