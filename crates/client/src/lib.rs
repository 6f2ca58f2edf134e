//! Clients of Fleetgate: the DPS and hub service API clients the CLI uses, and the Rust device
//! client (provisioning and hub) the simulator and benchmarks use.
#![forbid(unsafe_code)]

pub mod connection_string;
pub mod device;
pub mod hub_service;
mod rest;
pub mod service;

pub use connection_string::ConnectionString;
pub use hub_service::HubServiceClient;
pub use service::{DpsServiceClient, ServiceError};
