//! The IoT hub: what happens when a provisioned device connects to its hub. Authentication,
//! per-device topic rules, durable telemetry, twins, direct methods and cloud-to-device
//! messages, plus the hub service REST API. The MQTT session in `fleetgate-server` translates
//! packets into calls on [`Hub`]; nothing here touches a socket.
#![forbid(unsafe_code)]

pub mod authentication;
mod c2d;
mod config;
mod connections;
mod device_https;
mod errors;
pub mod hub;
mod methods;
pub mod mqtt;
pub mod registry;
pub mod service_api;
pub mod sessions;
pub mod telemetry;
pub mod twins;

pub use authentication::{Authentication, ConnectRefusal, HubDevice};
pub use config::HubConfig;
pub use hub::Hub;
pub use registry::{DeviceSpec, DeviceState};
pub use sessions::{DesiredPatch, MethodCall, Outbound, SessionFlags};
pub use twins::{TwinChange, TwinReplacement};
