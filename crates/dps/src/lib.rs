//! The provisioning service: authenticating devices, deciding and recording assignments, and
//! the DPS service REST API. Protocol front ends (MQTT here, HTTPS later) translate wire
//! messages into calls on [`Provisioning`] and its answers back into wire messages.

pub mod mqtt;
pub mod service;
pub mod service_api;

pub use service::{DeviceAuth, Provisioning, ProvisioningConfig, RegisterOutcome};
