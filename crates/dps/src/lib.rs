//! The provisioning service: authenticating devices, deciding and recording assignments, and
//! the DPS service REST API. Protocol front ends (MQTT and HTTPS in `server`, and this crate's
//! `device_api` router) translate wire
//! messages into calls on [`Provisioning`] and its answers back into wire messages.
#![forbid(unsafe_code)]

pub mod access_policies;
pub mod answer;
pub mod device_api;
pub mod linked_hubs;
mod management;
pub mod mqtt;
mod registration;
pub mod service;
pub mod service_api;
mod webhook;

pub use service::{DeviceAuth, EnrollmentRef, IdentityChanges, Provisioning, ProvisioningConfig, RegisterOutcome};
