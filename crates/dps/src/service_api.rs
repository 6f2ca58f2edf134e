//! The DPS service REST API (Azure's data plane, api-version 2021-10-01 and older): enrollment
//! groups and registration records, authenticated with shared access policy tokens.
//!
//! Routes are declared lower-case; the HTTP front end folds the literal path segments of each
//! request to lower case first, since SDKs differ (`enrollmentGroups` vs `enrollmentgroups`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fleetgate_core::time::Timestamp;
use fleetgate_core::{DpsError, ErrorCode};
use serde_json::Value;

use crate::Provisioning;

/// Largest request body the service API reads.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Page size when the client sends no `x-ms-max-item-count`, and the most it may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A [`DpsError`] as an HTTP response: Azure's JSON error body and `x-ms-error-code`.
pub struct ApiError(pub DpsError);

impl From<DpsError> for ApiError {
    fn from(e: DpsError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let tracking_id = uuid::Uuid::new_v4().to_string();
        let status = StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.0.to_body(&tracking_id, Timestamp::now()))).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        if let Ok(v) = HeaderValue::from_str(&self.0.code.code().to_string()) {
            h.insert("x-ms-error-code", v);
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn json(v: impl serde::Serialize) -> Response {
    let mut resp = Json(v).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    resp
}

pub fn router(dps: Arc<Provisioning>) -> Router {
    Router::new()
        .route("/enrollmentgroups/query", post(query_groups))
        .route("/enrollmentgroups/{id}", put(put_group).get(get_group).delete(delete_group))
        .route("/enrollmentgroups/{id}/attestationmechanism", post(group_attestation))
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
    match dps.authorize_service(auth) {
        Ok(_policy) => next.run(req).await,
        Err(e) => ApiError(e).into_response(),
    }
}

fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    let b = b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            DpsError::new(
                ErrorCode::PayloadTooLarge,
                format!("The request body is larger than {MAX_BODY_BYTES} bytes."),
            )
        } else {
            DpsError::bad_request("The request body could not be read.")
        }
    })?;
    if b.len() > MAX_BODY_BYTES {
        return Err(DpsError::new(
            ErrorCode::PayloadTooLarge,
            format!("The request body is larger than {MAX_BODY_BYTES} bytes."),
        )
        .into());
    }
    Ok(b)
}

fn if_match(headers: &HeaderMap) -> Option<String> {
    headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()).map(str::to_owned)
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
    Ok(json(dps.group(&id).await?.attestation))
}

/// Paging as Azure does it: `x-ms-max-item-count` asks for a page size, `x-ms-continuation`
/// (opaque to clients; here an offset) resumes, and is returned while more items remain.
struct Page {
    offset: usize,
    size: usize,
}

impl Page {
    fn from_headers(h: &HeaderMap) -> ApiResult<Self> {
        let size =
            match h.get("x-ms-max-item-count").map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok())) {
                None => DEFAULT_PAGE,
                Some(Some(n)) if n >= 1 => n.min(MAX_PAGE),
                Some(_) => return Err(DpsError::bad_request("x-ms-max-item-count must be a positive integer.").into()),
            };
        let offset =
            match h.get("x-ms-continuation").map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok())) {
                None => 0,
                Some(Some(n)) => n,
                Some(None) => {
                    return Err(DpsError::bad_request("x-ms-continuation is not a valid continuation token.").into())
                }
            };
        Ok(Self { offset, size })
    }

    /// `items` holds up to `size + 1` entries starting at `offset`; the extra one only tells
    /// whether another page exists.
    fn respond<T: serde::Serialize>(&self, mut items: Vec<T>, item_type: &'static str) -> Response {
        let more = items.len() > self.size;
        items.truncate(self.size);
        let mut resp = json(items);
        let h = resp.headers_mut();
        h.insert("x-ms-item-type", HeaderValue::from_static(item_type));
        h.insert("x-ms-max-item-count", HeaderValue::from(self.size));
        if more {
            h.insert("x-ms-continuation", HeaderValue::from(self.offset + self.size));
        }
        resp
    }
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
