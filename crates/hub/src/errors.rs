//! The hub's answers for what went wrong below it: a store fault, an unknown device. A leaf
//! module, so every concern can use them without importing the `Hub` itself.

use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::StoreError;

pub(crate) fn store_err(e: StoreError) -> AzureError {
    match e {
        StoreError::Rejected(d) => d,
        // The store could not answer: "retry later" (503, as the provisioning service answers
        // it), never an answer that reads as the caller's fault or as permanent.
        StoreError::Backend(msg) => {
            fleetgate_metrics::log_limited!(tracing::Level::ERROR, error = %msg, "store failure");
            AzureError::unavailable()
        }
        StoreError::Unavailable(msg) => {
            tracing::warn!(error = %msg, "store refused a change (retryable)");
            AzureError::unavailable()
        }
    }
}

pub(crate) fn not_found(device_id: &str) -> AzureError {
    AzureError::new(
        ErrorCode::DeviceNotFound,
        format!("Device '{}' was not found.", device_id.chars().take(140).collect::<String>()),
    )
}
