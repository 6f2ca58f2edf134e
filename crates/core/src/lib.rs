//! Fleetgate's domain: the rules of Azure DPS expressed as plain types and pure functions.
//!
//! Nothing here performs I/O or knows about a wire protocol; the store, the protocol front ends
//! and the CLI all call into this crate, never the other way round.
#![forbid(unsafe_code)]

pub mod allocation;
pub mod attestation;
pub mod audit;
pub mod device;
pub mod enrollment;
pub mod error;
pub mod etag;
pub mod feedback;
pub mod ids;
pub mod keys;
pub mod message;
pub mod policy;
pub mod query;
pub mod refusals;
pub mod registration;
pub mod sas;
pub mod throttle;
pub mod time;
pub mod topic;
pub mod twin;
pub mod x509;

pub use error::{AzureError, ErrorCode};
