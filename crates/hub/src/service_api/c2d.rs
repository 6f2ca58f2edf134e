//! The service side of cloud-to-device queues beyond sending: purging a device's queue and
//! reading the delivery feedback (Azure's `CloudToDeviceMessages` operations of the hub's REST
//! API, as the service SDKs' generated clients call them).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use fleetgate_rest::{json, ApiResult};
use serde_json::json;

use super::TargetHub;
use crate::Hub;

/// The content type of a feedback message's body (Azure's).
const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// `DELETE /devices/{id}/commands`: Azure's `PurgeMessageQueueResult`.
pub(super) async fn purge(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let purged = hub.purge_c2d(&t.0, &id).await?;
    Ok(json(json!({"deviceId": id, "totalMessagesPurged": purged})))
}

/// A lock token as sent in a path: bare or as the quoted `ETag` it came in.
fn lock_token(raw: &str) -> &str {
    raw.trim_matches('"')
}

/// `GET /messages/serviceBound/feedback`: 204 when there is none; otherwise one batch of
/// records (a JSON array) locked to the caller, its lock token in `ETag`, to be completed with
/// `DELETE …/feedback/{lockToken}` or given back with `POST …/feedback/{lockToken}/abandon`.
pub(super) async fn receive_feedback(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
) -> ApiResult<Response> {
    let Some(batch) = hub.receive_feedback(&t.0).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let mut resp = json(serde_json::to_value(&batch.records).unwrap_or_default());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FEEDBACK_CONTENT_TYPE));
    let now = fleetgate_core::time::Timestamp::now().to_azure_string();
    for (name, value) in
        [("etag", format!("\"{}\"", batch.lock_token)), ("iothub-enqueuedtime", now), ("iothub-userid", t.0.clone())]
    {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    Ok(resp)
}

/// `DELETE /messages/serviceBound/feedback/{lockToken}`: the batch is done with (204).
pub(super) async fn complete_feedback(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(lock): Path<String>,
) -> ApiResult<StatusCode> {
    hub.settle_feedback(&t.0, lock_token(&lock), true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /messages/serviceBound/feedback/{lockToken}/abandon`: the batch is unlocked for a later
/// receive (204).
pub(super) async fn abandon_feedback(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(lock): Path<String>,
) -> ApiResult<StatusCode> {
    hub.settle_feedback(&t.0, lock_token(&lock), false).await?;
    Ok(StatusCode::NO_CONTENT)
}
