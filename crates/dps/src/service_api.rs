//! The DPS service REST API (Azure's data plane, api-version 2021-10-01 and older): enrollment
//! groups and registration records, authenticated with shared access policy tokens.
//!
//! Routes are declared lower-case; the HTTP front end folds the literal path segments of each
//! request to lower case first, since SDKs differ (`enrollmentGroups` vs `enrollmentgroups`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use fleetgate_core::audit::AuditEntry;
use fleetgate_core::policy::Right;
use fleetgate_core::{DpsError, ErrorCode};
pub use fleetgate_rest::ApiError;
use fleetgate_rest::{body, if_match, json, ApiResult, Page};
use serde_json::Value;

use crate::Provisioning;

pub fn router(dps: Arc<Provisioning>) -> Router {
    Router::new()
        .route("/enrollmentgroups/query", post(query_groups))
        .route("/enrollmentgroups/{id}", put(put_group).get(get_group).delete(delete_group))
        .route("/enrollmentgroups/{id}/attestationmechanism", post(group_attestation))
        .route("/enrollments", post(bulk_enrollments))
        .route("/enrollments/query", post(query_enrollments))
        .route("/enrollments/{id}", put(put_enrollment).get(get_enrollment).delete(delete_enrollment))
        .route("/enrollments/{id}/attestationmechanism", post(enrollment_attestation))
        .route("/registrations/{id}", get(get_registration).delete(delete_registration))
        .route("/registrations/{id}/query", post(query_registrations))
        .method_not_allowed_fallback(|| async {
            ApiError(DpsError::new(ErrorCode::MethodNotAllowed, "Method not allowed."))
        })
        .route_layer(middleware::from_fn_with_state(dps.clone(), authorize))
        .with_state(dps)
}

async fn authorize(State(dps): State<Arc<Provisioning>>, req: Request, next: Next) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let needed = required_rights(req.method(), req.uri().path());
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let source = fleetgate_rest::client_ip(&req);
    match dps.authorize_service(auth, needed).await {
        Ok(policy) => {
            let resp = next.run(req).await;
            // Reads are not audited; every change (or attempted change) is.
            if method != axum::http::Method::GET
                && !path.ends_with("/query")
                && !path.ends_with("/attestationmechanism")
            {
                dps.audit().record(service_entry(&method, &path, &policy, resp.status().as_u16()));
            }
            resp
        }
        Err(e) if e.status() == 401 => {
            let refusal = service_entry(&method, &path, "(unauthenticated)", 401).reason("SAS token refused");
            dps.audit().refused(source, refusal);
            ApiError(e).into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// An audit entry for a DPS service API call; the target is the id in the path.
fn service_entry(method: &axum::http::Method, path: &str, policy: &str, status: u16) -> AuditEntry {
    let target =
        path.rsplit('/').find(|s| !s.is_empty() && *s != "query" && *s != "attestationmechanism").unwrap_or("");
    fleetgate_rest::service_audit_entry(method, path, policy, target, status)
}

/// The rights a call needs, as Azure's DPS policies grant them: reads and queries need the read
/// right of their collection, everything else the write right.
fn required_rights(method: &axum::http::Method, path: &str) -> &'static [Right] {
    let read = method == axum::http::Method::GET || path.ends_with("/query") || path.ends_with("/attestationmechanism");
    match (path.starts_with("/registrations"), read) {
        (true, true) => &[Right::RegistrationStatusRead],
        (true, false) => &[Right::RegistrationStatusWrite],
        (false, true) => &[Right::EnrollmentRead],
        (false, false) => &[Right::EnrollmentWrite],
    }
}

async fn put_group(
    State(dps): State<Arc<Provisioning>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    // The creator gets the keys back (generated ones are otherwise unknowable); reads redact them.
    Ok(json(dps.put_group(&id, &b, if_match(&headers)).await?))
}

async fn get_group(State(dps): State<Arc<Provisioning>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(dps.group(&id).await?.redacted()))
}

async fn delete_group(
    State(dps): State<Arc<Provisioning>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    dps.delete_group(&id, if_match(&headers).as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn group_attestation(State(dps): State<Arc<Provisioning>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(dps.group(&id).await?.settings.attestation))
}

/// The query language is SQL-like; Fleetgate answers the form every client sends
/// (`SELECT * FROM enrollmentGroups`) and refuses others clearly rather than guessing.
fn check_query(b: &[u8], collection: &str) -> ApiResult<()> {
    let v: Value =
        serde_json::from_slice(b).map_err(|e| DpsError::bad_request(format!("Malformed query specification: {e}")))?;
    let q = v
        .get("query")
        .and_then(Value::as_str)
        .ok_or_else(|| DpsError::bad_request("The query specification needs a 'query' string."))?;
    let normalized = q.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
    if normalized != format!("select * from {collection}") {
        return Err(DpsError::bad_request(format!("Unsupported query; use \"SELECT * FROM {collection}\".")).into());
    }
    Ok(())
}

async fn query_groups(
    State(dps): State<Arc<Provisioning>>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    check_query(&body(b)?, "enrollmentgroups")?;
    let page = Page::from_headers(&headers)?;
    let items: Vec<_> =
        dps.groups().await?.into_iter().skip(page.offset).take(page.size + 1).map(|g| g.redacted()).collect();
    Ok(page.respond(items, "enrollmentGroup"))
}

async fn put_enrollment(
    State(dps): State<Arc<Provisioning>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    Ok(json(dps.put_enrollment(&id, &b, if_match(&headers), false).await?))
}

async fn get_enrollment(State(dps): State<Arc<Provisioning>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(dps.enrollment(&id).await?.redacted()))
}

async fn delete_enrollment(
    State(dps): State<Arc<Provisioning>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    dps.delete_enrollment(&id, if_match(&headers).as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn enrollment_attestation(State(dps): State<Arc<Provisioning>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(dps.enrollment(&id).await?.settings.attestation))
}

async fn query_enrollments(
    State(dps): State<Arc<Provisioning>>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    check_query(&body(b)?, "enrollments")?;
    let page = Page::from_headers(&headers)?;
    let items: Vec<_> = dps.enrollments(page.offset, page.size + 1).await?.iter().map(|e| e.redacted()).collect();
    Ok(page.respond(items, "enrollment"))
}

async fn bulk_enrollments(
    State(dps): State<Arc<Provisioning>>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    Ok(json(dps.bulk_enrollments(&body(b)?).await?))
}

async fn get_registration(State(dps): State<Arc<Provisioning>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(dps.registration(&id).await?))
}

async fn delete_registration(
    State(dps): State<Arc<Provisioning>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    dps.delete_registration(&id, if_match(&headers).as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /registrations/{groupId}/query`: the group's records. The body (Node sends a query
/// specification, others nothing) does not narrow the result.
async fn query_registrations(
    State(dps): State<Arc<Provisioning>>,
    Path(group_id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    body(b)?;
    let page = Page::from_headers(&headers)?;
    let items = dps.registrations_of_group(&group_id, page.offset, page.size + 1).await?;
    Ok(page.respond(items, "deviceRegistration"))
}
