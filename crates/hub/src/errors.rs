//! The hub's answers for what went wrong below it: a store fault, an unknown device. A leaf
//! module, so every concern can use them without importing the `Hub` itself.

use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::StoreError;

/// See `impl From<StoreError> for AzureError`: a store fault is a retryable 503.
pub(crate) fn store_err(e: StoreError) -> AzureError {
    e.into()
}

pub(crate) fn not_found(device_id: &str) -> AzureError {
    AzureError::new(
        ErrorCode::DeviceNotFound,
        format!("Device '{}' was not found.", device_id.chars().take(140).collect::<String>()),
    )
}
