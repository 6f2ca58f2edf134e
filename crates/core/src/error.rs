//! Errors as Azure DPS and IoT Hub report them: an HTTP status plus a six-digit `errorCode`.
//!
//! Every front end (MQTT response topics, HTTPS responses) turns a [`AzureError`] into the same
//! status and JSON body; the mapping lives here and nowhere else.

use std::fmt;

/// Azure's six-digit error code: the HTTP status followed by three digits.
///
/// Only `401002` is confirmed from captures of the real service; the others follow the same
/// `<status><nnn>` convention and are Fleetgate's own choices (documented in docs/errors.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400004: the request body or a parameter is malformed.
    BadRequest,
    /// 400005: an id (registration id, enrollment group id) breaks the naming rules.
    InvalidId,
    /// 400208: no linked IoT hub can take the device (the C SDK special-cases this code).
    NoHubForAllocation,
    /// 400209: the enrollment names a hub that is not linked to this instance.
    HubNotLinked,
    /// 400210: the custom allocation webhook failed (unreachable, slow, bad answer).
    CustomAllocationFailed,
    /// 404204: no individual enrollment with that registration id.
    EnrollmentNotFound,
    /// 401002: authentication failed (bad, expired or unknown credentials).
    Unauthorized,
    /// 404201: no registration record with that id.
    RegistrationNotFound,
    /// 404202: no enrollment group with that id.
    EnrollmentGroupNotFound,
    /// 404203: the operation id is unknown for this registration.
    OperationNotFound,
    /// 404000: no such route.
    NotFound,
    /// 405000: method not allowed on this route.
    MethodNotAllowed,
    /// 409201: the resource already exists (create-only operations).
    Conflict,
    /// 412002: the `If-Match` etag does not match the stored resource.
    PreconditionFailed,
    /// 413000: the request body is larger than the limit.
    PayloadTooLarge,
    /// 415000: the body is not JSON.
    UnsupportedMediaType,
    /// 429001: too many requests.
    Throttled,
    /// 500000: an internal error; nothing was changed.
    Internal,
    /// 503000: the service cannot check or do this now (its storage failed, or its disk is below
    /// the free-space reserve); nothing was changed, and the same request can succeed later.
    ServiceUnavailable,
    /// 404001 (IoT Hub): no device with that id in the hub's registry.
    DeviceNotFound,
    /// 409001 (IoT Hub): a device with that id already exists.
    DeviceAlreadyExists,
    /// 404103 (IoT Hub): a direct method was invoked on a device that is not connected.
    DeviceNotOnline,
    /// 504101 (IoT Hub): the device did not answer a direct method in time.
    GatewayTimeout,
    /// 403004 (IoT Hub): the device's cloud-to-device queue is full.
    QueueDepthExceeded,
    /// 413001 (IoT Hub): the message is larger than the hub accepts.
    MessageTooLarge,
    /// 408000: the request (its body) did not arrive in time.
    RequestTimeout,
    /// 412020 (IoT Hub): the lock token names no message locked now (completed, expired, or
    /// never issued).
    DeviceMessageLockLost,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::BadRequest => 400004,
            ErrorCode::InvalidId => 400005,
            ErrorCode::NoHubForAllocation => 400208,
            ErrorCode::HubNotLinked => 400209,
            ErrorCode::CustomAllocationFailed => 400210,
            ErrorCode::EnrollmentNotFound => 404204,
            ErrorCode::Unauthorized => 401002,
            ErrorCode::RegistrationNotFound => 404201,
            ErrorCode::EnrollmentGroupNotFound => 404202,
            ErrorCode::OperationNotFound => 404203,
            ErrorCode::NotFound => 404000,
            ErrorCode::MethodNotAllowed => 405000,
            ErrorCode::Conflict => 409201,
            ErrorCode::PreconditionFailed => 412002,
            ErrorCode::PayloadTooLarge => 413000,
            ErrorCode::UnsupportedMediaType => 415000,
            ErrorCode::Throttled => 429001,
            ErrorCode::Internal => 500000,
            ErrorCode::ServiceUnavailable => 503000,
            ErrorCode::DeviceNotFound => 404001,
            ErrorCode::DeviceAlreadyExists => 409001,
            ErrorCode::DeviceNotOnline => 404103,
            ErrorCode::GatewayTimeout => 504101,
            ErrorCode::QueueDepthExceeded => 403004,
            ErrorCode::MessageTooLarge => 413001,
            ErrorCode::RequestTimeout => 408000,
            ErrorCode::DeviceMessageLockLost => 412020,
        }
    }

    /// The HTTP status (and MQTT response-topic status) that carries this code.
    pub fn status(self) -> u16 {
        (self.code() / 1000) as u16
    }
}

/// A failed request in Azure's terms, for DPS, the hub, the REST edge and the store alike: one
/// of Azure's error codes (which decides the status) and a message safe to show the caller
/// (never a key or a signature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureError {
    pub code: ErrorCode,
    pub message: String,
    /// Whole seconds the caller should wait before retrying, when the refusal knows it (a
    /// throttled request: the time until its quota frees a slot). `None`: the front end's
    /// default hint for the status, if any.
    pub retry_after: Option<u32>,
}

impl AzureError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after: None }
    }
    /// The same error, telling the caller to wait `secs` before retrying.
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::Unauthorized, "Unauthorized")
    }
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "Internal server error; the request was not applied.")
    }
    /// A fault on our side (storage, or a disk below its reserve): nothing was applied, and every
    /// SDK retries a 503.
    pub fn unavailable() -> Self {
        Self::new(
            ErrorCode::ServiceUnavailable,
            "The service is temporarily unavailable; retry later. Nothing was applied.",
        )
    }
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// Azure's `ProvisioningServiceErrorDetails` body.
    pub fn to_body(&self, tracking_id: &str, timestamp: crate::time::Timestamp) -> serde_json::Value {
        serde_json::json!({
            "errorCode": self.code.code(),
            "trackingId": tracking_id,
            "message": self.message,
            "timestampUtc": timestamp.to_azure_string(),
        })
    }
}

impl fmt::Display for AzureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code.code(), self.status(), self.message)
    }
}

impl std::error::Error for AzureError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes Azure's SDKs and tools match on, pinned by hand (docs/errors.md): a changed
    /// number or status here is a change of the wire, not a refactor.
    #[test]
    fn codes_and_statuses_are_azures() {
        let expected = [
            (ErrorCode::BadRequest, 400, 400004),
            (ErrorCode::InvalidId, 400, 400005),
            (ErrorCode::Unauthorized, 401, 401002),
            (ErrorCode::RegistrationNotFound, 404, 404201),
            (ErrorCode::EnrollmentGroupNotFound, 404, 404202),
            (ErrorCode::EnrollmentNotFound, 404, 404204),
            (ErrorCode::DeviceNotFound, 404, 404001),
            (ErrorCode::DeviceNotOnline, 404, 404103),
            (ErrorCode::PreconditionFailed, 412, 412002),
            (ErrorCode::Throttled, 429, 429001),
            (ErrorCode::Internal, 500, 500000),
            (ErrorCode::ServiceUnavailable, 503, 503000),
            (ErrorCode::GatewayTimeout, 504, 504101),
        ];
        for (c, status, code) in expected {
            assert_eq!((c.status(), c.code()), (status, code), "{c:?}");
        }
        assert_eq!(AzureError::unauthorized().code.code(), 401002);
    }

    #[test]
    fn body_has_azure_fields() {
        let b = AzureError::unauthorized().to_body("t-1", crate::time::Timestamp::from_unix_seconds(0));
        assert_eq!(b["errorCode"], 401002);
        assert_eq!(b["trackingId"], "t-1");
        assert_eq!(b["message"], "Unauthorized");
        assert_eq!(b["timestampUtc"], "1970-01-01T00:00:00.0000000Z");
    }
}
