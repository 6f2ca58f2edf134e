//! Clients of Fleetgate: the DPS service API client the CLI uses (the Rust device client joins
//! it with the hub).

pub mod connection_string;
pub mod device;
pub mod service;

pub use connection_string::ConnectionString;
pub use service::{DpsServiceClient, ServiceError};
