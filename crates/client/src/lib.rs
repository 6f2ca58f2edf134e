#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod connection_string;
pub mod device;
pub mod dps_types;
mod error;
pub mod hub_service;
pub mod hub_types;
mod rest;
pub mod service;

pub use connection_string::ConnectionString;
pub use device::{register, C2dMessage, HubClient, HubOptions, RegisterOptions, RegistrationResult};
pub use dps_types::{
    AttestationMechanism, BulkEnrollmentError, BulkEnrollmentResult, BulkMode, EnrollmentGroup, IndividualEnrollment,
    RegistrationState, ReprovisionPolicy, SymmetricKeyAttestation,
};
pub use error::{ApiError, BoxError, Error};
pub use hub_service::{C2dOptions, HubServiceClient, RawHubClient};
pub use hub_types::{
    Device, DeviceAuthentication, EventBody, EventProperties, MethodResult, TelemetryEvent, Twin, TwinProperties,
};
pub use service::{DpsServiceClient, RawDpsClient, ServiceError};

/// The error of [`SymmetricKey::from_base64`] and the other `fleetgate-core` parsers.
pub use fleetgate_core::error::AzureError as KeyError;
/// The types of `fleetgate-core` that appear in this crate's API, so that depending on
/// `fleetgate-client` alone is enough.
pub use fleetgate_core::keys::SymmetricKey;
/// Message properties: system (`message-id`, `content-type`, ...) and application properties.
pub use fleetgate_core::message::Properties;

/// Derives a device's key from its enrollment group's key (base64): HMAC-SHA256 of the
/// registration id, as Azure's SDKs and `az iot dps enrollment-group compute-device-key` do.
pub fn derive_device_key(group_key_base64: &str, registration_id: &str) -> Result<SymmetricKey, KeyError> {
    Ok(SymmetricKey::from_base64(group_key_base64)?.derive_device_key(registration_id))
}
