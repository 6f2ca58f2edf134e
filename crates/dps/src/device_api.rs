//! DPS over HTTPS, the device side (SPEC-DEV 2021-10-01, as the Node, C and C# SDKs call it):
//!
//! | request | answer |
//! |---|---|
//! | `PUT /{idScope}/registrations/{registrationId}/register` | 200 + final `RegistrationOperationStatus`, or 202 + `Retry-After` + `assigning` |
//! | `GET /{idScope}/registrations/{registrationId}/operations/{operationId}` | 200 + `RegistrationOperationStatus` |
//! | `POST` (or `GET`) `/{idScope}/registrations/{registrationId}` | 200 + `DeviceRegistrationResult` |
//!
//! Every request carries the device's SAS token in `Authorization` (the same token the MQTT
//! transport sends as its password) and is authenticated on its own, before its body is read:
//! who may send one depends on the path and the headers only, so a stranger's body is never
//! waited for or buffered. Bodies are read leniently
//! (Node sends `{}` with its GET, C# sends no body on some requests); the registration id always
//! comes from the path. Every answer, errors included, is JSON with
//! `Content-Type: application/json; charset=utf-8` (Node parses nothing else). No `User-Agent`
//! is required (the C SDK sends `UserAgent`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use fleetgate_core::x509::CertificateChain;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_rest::{body, json, ApiError, ClientAddr};

use crate::answer::{self, Answer};
use crate::mqtt::register_payload;
use crate::{DeviceAuth, Provisioning};

/// The device-facing routes. Literal segments are lower case (the HTTPS front end folds
/// `registrations`); ids keep their case.
pub fn device_router(dps: Arc<Provisioning>) -> Router {
    Router::new()
        .route("/{scope}/registrations/{registration_id}/register", put(register))
        .route("/{scope}/registrations/{registration_id}/operations/{operation_id}", get(operation_status))
        .route("/{scope}/registrations/{registration_id}", get(status_lookup).post(status_lookup))
        .method_not_allowed_fallback(|| async {
            ApiError(AzureError::new(ErrorCode::MethodNotAllowed, "Method not allowed."))
        })
        .with_state(dps)
}

/// An error as the device sees it: Azure's JSON error body and `x-ms-error-code`, plus a
/// `Retry-After` where a retry makes sense (429, 5xx).
fn error_response(e: AzureError) -> Response {
    let retry = answer::error_retry_after(&e);
    let mut resp = ApiError(e).into_response();
    if let Some(secs) = retry {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn answer_response(a: Answer) -> Response {
    let mut resp = json(a.body);
    *resp.status_mut() = http::StatusCode::from_u16(a.status).unwrap_or(http::StatusCode::OK);
    if let Some(secs) = a.retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn path_error(r: PathRejection) -> AzureError {
    AzureError::bad_request(format!("Malformed request path: {}", r.body_text()))
}

/// The client certificate chain of the request's TLS connection, if the device presented one
/// (the HTTPS front end puts it in the request's extensions).
type PeerCertificates = Option<Extension<CertificateChain>>;

/// The address the request came from (the HTTPS front end records it).
type Source = Option<Extension<ClientAddr>>;

/// Authenticates the request's SAS token for `{scope}/registrations/{registration_id}`, or,
/// without one, the TLS client certificate.
async fn authenticate(
    dps: &Provisioning,
    scope: &str,
    registration_id: &str,
    headers: &HeaderMap,
    peer: &PeerCertificates,
    source: &Source,
) -> Result<DeviceAuth, AzureError> {
    let token =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::trim).filter(|t| !t.is_empty());
    let source = source.as_ref().map(|Extension(a)| a.0.ip());
    dps.authenticate(scope, registration_id, token, peer.as_ref().map(|Extension(c)| c), source).await
}

async fn register(
    State(dps): State<Arc<Provisioning>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    peer: PeerCertificates,
    source: Source,
    request: Request,
) -> Response {
    let result = async {
        let Path((scope, registration_id)) = path.map_err(path_error)?;
        let mut auth = authenticate(&dps, &scope, &registration_id, &headers, &peer, &source).await?;
        auth.api_version = request.uri().query().and_then(|q| crate::mqtt::query_param(q, "api-version"));
        let b = body(Bytes::from_request(request, &()).await).map_err(|e| e.0)?;
        let payload = register_payload(&b).map_err(AzureError::bad_request)?;
        answer::register(&dps, &auth, payload).await
    }
    .await;
    result.map_or_else(error_response, answer_response)
}

async fn operation_status(
    State(dps): State<Arc<Provisioning>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    peer: PeerCertificates,
    source: Source,
    request: Request,
) -> Response {
    let result = async {
        let Path((scope, registration_id, operation_id)) = path.map_err(path_error)?;
        let auth = authenticate(&dps, &scope, &registration_id, &headers, &peer, &source).await?;
        // Node sends `{}` as the body of this GET: read (within the limits) and dropped, so the
        // connection stays usable for the device's next poll.
        body(Bytes::from_request(request, &()).await).map_err(|e| e.0)?;
        answer::operation_status(&dps, &auth, &operation_id).await
    }
    .await;
    result.map_or_else(error_response, answer_response)
}

/// The device's own registration record (`DeviceRegistrationResult`). Azure documents this as
/// a POST with a `DeviceRegistration` body; GET is answered the same way.
async fn status_lookup(
    State(dps): State<Arc<Provisioning>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    peer: PeerCertificates,
    source: Source,
    request: Request,
) -> Response {
    let result = async {
        let Path((scope, registration_id)) = path.map_err(path_error)?;
        let auth = authenticate(&dps, &scope, &registration_id, &headers, &peer, &source).await?;
        // The `DeviceRegistration` body names the same device as the path: read and dropped.
        body(Bytes::from_request(request, &()).await).map_err(|e| e.0)?;
        let record = dps.registration(auth.registration_id.as_str()).await?;
        Ok::<_, AzureError>(json(record.device_result()))
    }
    .await;
    result.unwrap_or_else(error_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_are_json_with_azure_codes() {
        let resp = error_response(AzureError::unauthorized());
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json; charset=utf-8");
        assert_eq!(resp.headers()["x-ms-error-code"], "401002");
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
        let resp = error_response(AzureError::internal());
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn answers_carry_status_and_retry_after() {
        let resp = answer_response(Answer {
            status: 202,
            retry_after: Some(2),
            body: serde_json::json!({"status": "assigning"}),
        });
        assert_eq!(resp.status(), 202);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json; charset=utf-8");
    }
}
