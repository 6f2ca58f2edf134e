//! The one error type of this crate, shared by the device client (DPS registration, hub MQTT)
//! and the service clients (DPS and hub REST): a device developer matches on what happened
//! (credentials refused, throttled, not found, ...) without caring which protocol said it.

use std::time::Duration;

use serde_json::Value;

use crate::device::RegistrationState;

/// A boxed cause, kept as [`std::error::Error::source`] of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong. Every variant says what the caller can do about it; the `source` chain keeps
/// the lower layers' causes (I/O, TLS, HTTP).
///
/// ```
/// use fleetgate_client::Error;
///
/// fn advice(e: &Error) -> &'static str {
///     match e {
///         Error::Unauthorized(_) => "check the key (a group key must be derived per device)",
///         Error::Throttled { .. } | Error::ServerError { .. } => "wait retry_after(), then try again",
///         Error::NotFound(_) => "no such enrollment, device or record",
///         Error::Tls { .. } => "trust the server's CA (Fleetgate's ca.pem)",
///         _ => "see the message",
///     }
/// }
/// # let _ = advice;
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options cannot be used (no host, a second C2D subscription, ...). Fix the call.
    #[error("invalid options: {0}")]
    Config(String),
    /// No answer: the name did not resolve, the TCP connection was refused, dropped or timed
    /// out (the service clients' 15 s connect timeout). Often transient;
    /// [`Error::is_retryable`] is true.
    #[error("{message}")]
    Transport {
        /// What failed, in one line.
        message: String,
        /// The lower layer's error (I/O, HTTP), when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The TLS handshake failed: the CA PEM holds no certificate, or the server's certificate is
    /// not signed by the trusted CA or does not carry the expected name (see
    /// `server_name` in the device options).
    #[error("TLS: {message}")]
    Tls {
        /// What failed, in one line.
        message: String,
        /// The TLS library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The service refused the credentials: HTTP 401, DPS status 401 (errorCode 401002 for a
    /// wrong device key), or an MQTT CONNACK 4 (bad user name or password) or 5 (not
    /// authorized), which [`ApiError::status`] reports as 401. Retrying with the same key will
    /// not help.
    #[error("unauthorized: {0}")]
    Unauthorized(Box<ApiError>),
    /// The credentials are valid but lack the right for this operation (HTTP 403).
    #[error("forbidden: {0}")]
    Forbidden(Box<ApiError>),
    /// No such enrollment, registration record, device or twin (HTTP 404).
    #[error("not found: {0}")]
    NotFound(Box<ApiError>),
    /// The `If-Match` etag no longer matches, or the item already exists (HTTP 412, 409): read it
    /// again and retry with its current etag.
    #[error("precondition failed: {0}")]
    PreconditionFailed(Box<ApiError>),
    /// Too many requests (HTTP or DPS status 429): wait `retry_after` (the service's
    /// `Retry-After`, when it sent one) and try again.
    #[error("throttled{}: {error}", retry_suffix(*retry_after))]
    Throttled {
        /// How long the service asked to wait.
        retry_after: Option<Duration>,
        /// The service's answer.
        error: Box<ApiError>,
    },
    /// The service failed (HTTP 5xx): usually transient; wait `retry_after` if given.
    #[error("server error{}: {error}", retry_suffix(*retry_after))]
    ServerError {
        /// How long the service asked to wait.
        retry_after: Option<Duration>,
        /// The service's answer.
        error: Box<ApiError>,
    },
    /// Any other error answer (400 bad request, ...): the request itself is wrong.
    #[error("{0}")]
    Api(Box<ApiError>),
    /// The MQTT server refused the connection with this CONNACK return code, for a reason other
    /// than credentials (1 protocol version, 2 client id, 3 server unavailable).
    #[error("connection refused: CONNACK {0} ({meaning})", meaning = connack_meaning(*.0))]
    Refused(u8),
    /// DPS ended the registration in `failed` or `disabled` (a disabled enrollment, an
    /// allocation that found no hub, ...); the service's registration state says why.
    #[error("registration {status}")]
    RegistrationFailed {
        /// `failed` or `disabled`.
        status: String,
        /// The service's `registrationState` (its `errorCode` and `errorMessage`).
        registration_state: Box<RegistrationState>,
    },
    /// No answer within the configured timeout.
    #[error("timed out")]
    Timeout,
    /// The server sent something this client does not understand (a malformed answer).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The client was disconnected (by `disconnect`, or the connection ended before an
    /// operation completed).
    #[error("disconnected")]
    Disconnected,
}

fn retry_suffix(d: Option<Duration>) -> String {
    d.map(|d| format!(" (retry after {} s)", d.as_secs())).unwrap_or_default()
}

fn connack_meaning(code: u8) -> &'static str {
    match code {
        1 => "unacceptable protocol version",
        2 => "identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown",
    }
}

/// An error answer of the service, as Azure shapes it: the status, Azure's numeric `errorCode`
/// (e.g. 401002, 404201, 412002), its message and tracking id, and the body as received.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status, or the DPS-over-MQTT status (401 for an MQTT CONNACK refusal).
    pub status: u16,
    /// Azure's `errorCode`, when the body had one.
    pub error_code: Option<u32>,
    /// Azure's `message` (`Message` for the hub), or the body's text.
    pub message: String,
    /// Azure's `trackingId`, to quote when reporting a problem.
    pub tracking_id: Option<String>,
    /// The error body as received (`null` when empty).
    pub body: Value,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error_code {
            Some(code) => write!(f, "{} {code}: {}", self.status, self.message),
            None => write!(f, "{}: {}", self.status, self.message),
        }
    }
}

impl ApiError {
    /// Reads Azure's error body (`{"errorCode": 404201, "trackingId": ..., "message": ...}`,
    /// or the hub's `{"Message": ...}`); any other body becomes the message as text.
    pub fn from_body(status: u16, body: Value) -> Self {
        let field = |k: &str| body.get(k).or_else(|| body.get(capitalized(k).as_str()));
        let error_code = field("errorCode").and_then(|c| match c {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) => s.parse().ok(),
            _ => None,
        });
        let message = match field("message").and_then(Value::as_str) {
            Some(m) => m.to_owned(),
            None => match &body {
                Value::Null => String::new(),
                Value::String(s) => s.trim().to_owned(),
                other => other.to_string(),
            },
        };
        let tracking_id = field("trackingId").and_then(Value::as_str).map(str::to_owned);
        Self { status, error_code, message, tracking_id, body }
    }
}

fn capitalized(k: &str) -> String {
    let mut c = k.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

impl Error {
    /// The error for a service answer with a non-success `status`: the variant follows the
    /// status (401 → [`Error::Unauthorized`], 429 → [`Error::Throttled`], ...); `retry_after`
    /// is the service's `Retry-After` (HTTP header, or DPS's `retry-after` topic parameter).
    pub fn from_status(status: u16, retry_after: Option<Duration>, body: Value) -> Self {
        let error = Box::new(ApiError::from_body(status, body));
        match status {
            401 => Error::Unauthorized(error),
            403 => Error::Forbidden(error),
            404 => Error::NotFound(error),
            409 | 412 => Error::PreconditionFailed(error),
            429 => Error::Throttled { retry_after, error },
            500..=599 => Error::ServerError { retry_after, error },
            _ => Error::Api(error),
        }
    }

    /// The service's error answer, for the variants that carry one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Error::Unauthorized(e)
            | Error::Forbidden(e)
            | Error::NotFound(e)
            | Error::PreconditionFailed(e)
            | Error::Api(e)
            | Error::Throttled { error: e, .. }
            | Error::ServerError { error: e, .. } => Some(e),
            _ => None,
        }
    }

    /// The HTTP (or DPS) status of a service error answer.
    pub fn status(&self) -> Option<u16> {
        self.api_error().map(|e| e.status)
    }

    /// How long the service asked to wait before retrying, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Throttled { retry_after, .. } | Error::ServerError { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when the same request may succeed later: throttling, server errors, timeouts,
    /// transport failures, a CONNACK 3 (server unavailable).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Throttled { .. }
                | Error::ServerError { .. }
                | Error::Timeout
                | Error::Transport { .. }
                | Error::Refused(3)
        )
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_))
    }

    /// The message followed by every cause in the `source` chain, each once (layers often
    /// repeat the message below them): reqwest's own line is the same for a refused
    /// connection, an untrusted certificate and an unknown host, and only the causes say which.
    pub fn detail(&self) -> String {
        chain_text(self)
    }

    /// A short, stable description for grouping failures (e.g. `401002 Unauthorized`): no
    /// addresses, ids or other per-device detail where the error allows it.
    pub fn reason(&self) -> String {
        match self {
            Error::RegistrationFailed { status, registration_state } => match registration_state.error_code {
                Some(code) => format!(
                    "registration {status}: {code} {}",
                    registration_state.error_message.as_deref().unwrap_or("")
                ),
                None => format!("registration {status}"),
            },
            other => match other.api_error() {
                Some(ApiError { error_code: Some(code), message, .. }) => format!("{code} {message}"),
                // An MQTT CONNACK refusal: its message says it all.
                Some(ApiError { error_code: None, body: Value::Null, message, .. })
                    if message.starts_with("connection refused") =>
                {
                    message.clone()
                }
                Some(ApiError { status, message, .. }) => format!("{status} {message}"),
                None => other.to_string(),
            },
        }
    }

    pub(crate) fn transport(message: impl Into<String>) -> Self {
        Error::Transport { message: message.into(), source: None }
    }

    pub(crate) fn tls(message: impl Into<String>) -> Self {
        Error::Tls { message: message.into(), source: None }
    }

    /// A refused MQTT connection: credentials (4, 5) are [`Error::Unauthorized`].
    pub(crate) fn connack(code: u8) -> Self {
        match code {
            4 | 5 => Error::Unauthorized(Box::new(ApiError {
                status: 401,
                error_code: None,
                message: format!("connection refused: CONNACK {code} ({})", connack_meaning(code)),
                tracking_id: None,
                body: Value::Null,
            })),
            other => Error::Refused(other),
        }
    }

    /// A request that got no answer: [`Error::Tls`] when a TLS error is among its causes,
    /// [`Error::Transport`] otherwise.
    pub(crate) fn from_request(e: reqwest::Error) -> Self {
        let tls = has_tls_cause(&e);
        let message = e.to_string();
        let source = Some(Box::new(e) as BoxError);
        if tls {
            Error::Tls { message, source }
        } else {
            Error::Transport { message, source }
        }
    }
}

fn has_tls_cause(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    // io::Error's `source` skips the error it wraps (hyper nests them two deep); look inside.
    if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        if has_tls_cause(inner) {
            return true;
        }
    }
    e.source().is_some_and(has_tls_cause)
}

fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    text
}

impl From<rumqttc::ConnectionError> for Error {
    fn from(e: rumqttc::ConnectionError) -> Self {
        use rumqttc::{ConnectReturnCode as C, ConnectionError as E};
        match e {
            E::ConnectionRefused(code) => Error::connack(match code {
                C::Success => 0,
                C::RefusedProtocolVersion => 1,
                C::BadClientId => 2,
                C::ServiceUnavailable => 3,
                C::BadUserNamePassword => 4,
                C::NotAuthorized => 5,
            }),
            E::Tls(e) => Error::Tls { message: e.to_string(), source: Some(Box::new(e)) },
            E::NetworkTimeout => Error::Timeout,
            E::RequestsDone => Error::Disconnected,
            other => Error::Transport { message: other.to_string(), source: Some(Box::new(other)) },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn statuses_map_to_variants() {
        let body = json!({"errorCode": 401002, "trackingId": "t-1", "message": "Unauthorized"});
        let e = Error::from_status(401, None, body.clone());
        match &e {
            Error::Unauthorized(a) => {
                assert_eq!((a.status, a.error_code, a.message.as_str()), (401, Some(401002), "Unauthorized"));
                assert_eq!(a.tracking_id.as_deref(), Some("t-1"));
                assert_eq!(a.body, body);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.reason(), "401002 Unauthorized");
        assert!(!e.is_retryable());

        let e = Error::from_status(429, Some(Duration::from_secs(7)), json!({"errorCode": 429001, "message": "slow"}));
        assert!(matches!(e, Error::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(7)), "{e:?}");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "throttled (retry after 7 s): 429 429001: slow");

        assert!(matches!(Error::from_status(404, None, Value::Null), Error::NotFound(_)));
        assert!(Error::from_status(404, None, Value::Null).is_not_found());
        assert!(matches!(Error::from_status(412, None, Value::Null), Error::PreconditionFailed(_)));
        assert!(matches!(Error::from_status(409, None, Value::Null), Error::PreconditionFailed(_)));
        assert!(matches!(Error::from_status(403, None, Value::Null), Error::Forbidden(_)));
        assert!(matches!(Error::from_status(503, None, Value::Null), Error::ServerError { .. }));
        assert!(matches!(Error::from_status(400, None, Value::Null), Error::Api(_)));
        assert_eq!(Error::from_status(400, None, json!({"errorCode": 400004})).status(), Some(400));
    }

    #[test]
    fn error_bodies_are_read_in_azures_shapes() {
        // The hub's shape, a text body, and a string error code.
        let hub = ApiError::from_body(404, json!({"Message": "ErrorCode:DeviceNotFound;no device"}));
        assert_eq!(hub.message, "ErrorCode:DeviceNotFound;no device");
        let text = ApiError::from_body(502, Value::String(" bad gateway\n".into()));
        assert_eq!((text.message.as_str(), text.error_code), ("bad gateway", None));
        assert_eq!(ApiError::from_body(400, json!({"errorCode": "400004"})).error_code, Some(400004));
    }

    #[test]
    fn connack_refusals() {
        for code in [4, 5] {
            let e = Error::connack(code);
            assert!(matches!(&e, Error::Unauthorized(a) if a.status == 401), "{e:?}");
        }
        assert_eq!(Error::connack(5).reason(), "connection refused: CONNACK 5 (not authorized)");
        assert!(matches!(Error::connack(3), Error::Refused(3)));
        assert!(Error::connack(3).is_retryable());
    }

    #[test]
    fn sources_are_kept() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::Transport { message: "connecting".into(), source: Some(Box::new(io)) };
        assert_eq!(e.source().unwrap().to_string(), "refused");
        assert_eq!(e.detail(), "connecting: refused");
    }
}
