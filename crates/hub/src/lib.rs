//! The IoT hub: what happens when a provisioned device connects to its hub. Authentication,
//! per-device topic rules, durable telemetry, twins, direct methods and cloud-to-device
//! messages, plus the hub service REST API. The MQTT session in `fleetgate-server` translates
//! packets into calls on [`Hub`]; nothing here touches a socket.
#![forbid(unsafe_code)]

pub mod hub;
pub mod mqtt;
pub mod service_api;
pub mod sessions;
pub mod telemetry;

pub use hub::{Hub, HubConfig, HubDevice};
pub use sessions::{DesiredPatch, MethodCall, Outbound, SessionFlags};
