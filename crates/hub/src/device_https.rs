//! The hub's device-facing HTTPS endpoints, for devices that speak only HTTPS (Azure's HTTP
//! transport of the device SDKs): telemetry (`POST /devices/{id}/messages/events`, one message
//! or a batch) and cloud-to-device receive (`GET /devices/{id}/messages/deviceBound`) with
//! complete (`DELETE …/{etag}`), reject (`DELETE …/{etag}?reject`) and abandon
//! (`POST …/{etag}/abandon`). They share the service API's router (the paths overlap theirs);
//! the caller is identified here, and only for its own id.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use fleetgate_core::message::Properties;
use fleetgate_core::sas::SasToken;
use fleetgate_core::x509::CertificateChain;
use fleetgate_core::AzureError;
use fleetgate_rest::{body, ApiResult};
use fleetgate_store::C2dSettlement;

use crate::authentication::{Authentication, HubDevice};
use crate::Hub;

/// The content type of a batch of telemetry messages (Azure's HTTP transport).
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

/// Who called a device route.
pub(crate) enum DeviceCaller {
    /// The device, with its own SAS token or X.509 certificate.
    Device(HubDevice),
    /// A token signed with a shared access policy: checked as the service API checks them
    /// (the route needs `DeviceConnect`), then [`Hub::acting_for`].
    Policy,
    /// Refused (recorded and counted by [`Hub::authenticate`]).
    Refused,
    /// The store could not be read.
    CouldNotCheck,
}

/// Identifies the caller of a device route for device `id`: a device SAS token (`sr`
/// `{hub}/devices/{id}`, no `skn`) in `Authorization`, or, without one, the TLS client
/// certificate of an X.509 device (the hub then named by the `Host` header).
pub(crate) fn identify<'a>(
    hub: &'a Hub,
    req: &Request,
    id: &'a str,
) -> impl std::future::Future<Output = DeviceCaller> + Send + 'a {
    // Owned copies: the request (its body is not `Sync`) is not held across the checks' awaits.
    let source = fleetgate_rest::client_ip(req);
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let chain = req.extensions().get::<CertificateChain>().cloned();
    let host = match auth.as_deref().map(SasToken::parse) {
        Some(Ok(t)) if t.key_name.is_some() => None,
        Some(Ok(t)) => Some(fleetgate_rest::token_host(&t.resource).to_owned()),
        // Malformed: refused below, counted like a wrong key.
        Some(Err(_)) => Some(String::new()),
        None => {
            let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
            Some(host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned())
        }
    };
    async move {
        let Some(host) = host else { return DeviceCaller::Policy };
        match hub.authenticate(&host, id, auth.as_deref(), chain.as_ref(), source).await {
            Authentication::Identified(d) => DeviceCaller::Device(d),
            Authentication::Refused(_) => DeviceCaller::Refused,
            Authentication::CouldNotCheck => DeviceCaller::CouldNotCheck,
        }
    }
}

/// The `iothub-*` request headers that set a message's system properties.
const SYSTEM_HEADERS: &[(&str, &str)] = &[
    ("iothub-messageid", "message-id"),
    ("iothub-correlationid", "correlation-id"),
    ("iothub-contenttype", "content-type"),
    ("iothub-contentencoding", "content-encoding"),
];

/// Properties from `iothub-*` names and values (headers, or a batch item's `properties`).
fn properties<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Properties {
    let mut p = Properties::default();
    for (name, value) in pairs {
        let name = name.to_ascii_lowercase();
        if let Some((_, system)) = SYSTEM_HEADERS.iter().find(|(h, _)| *h == name) {
            p.system.insert((*system).to_owned(), value.to_owned());
        } else if let Some(app) = name.strip_prefix("iothub-app-") {
            p.application.insert(app.to_owned(), value.to_owned());
        }
    }
    p
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchItem {
    body: String,
    #[serde(default)]
    base64_encoded: bool,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

/// `POST /devices/{id}/messages/events`: one message (the body; properties in `iothub-*`
/// headers), or with `Content-Type: application/vnd.microsoft.iothub.json` a JSON array of
/// `{"body", "base64Encoded", "properties"}` (Azure's batch, 256 KB in all). 204 once stored.
pub(crate) async fn send_event(
    State(hub): State<Arc<Hub>>,
    Extension(d): Extension<HubDevice>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let b = body(b)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE)) {
        if b.len() > hub.config.max_message_bytes {
            return Err(AzureError::new(
                fleetgate_core::ErrorCode::MessageTooLarge,
                "The batch is larger than 256 KB.",
            )
            .into());
        }
        let items: Vec<BatchItem> =
            serde_json::from_slice(&b).map_err(|e| AzureError::bad_request(format!("Malformed batch: {e}")))?;
        // All are checked before any is stored, so a bad item leaves nothing half-sent.
        let mut messages = Vec::with_capacity(items.len());
        for item in items {
            let data = if item.base64_encoded {
                base64::engine::general_purpose::STANDARD
                    .decode(item.body.as_bytes())
                    .map_err(|_| AzureError::bad_request("A batch item's body is not base64."))?
            } else {
                item.body.into_bytes()
            };
            let bag = properties(item.properties.iter().map(|(k, v)| (k.as_str(), v.as_str()))).to_bag();
            fleetgate_core::message::check_bag(&bag).map_err(|e| AzureError::bad_request(e.to_string()))?;
            messages.push((bag, Bytes::from(data)));
        }
        for (bag, data) in messages {
            hub.ingest(&d, &bag, data).await?;
        }
    } else {
        let bag = properties(headers.iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))).to_bag();
        hub.ingest(&d, &bag, b).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /devices/{id}/messages/deviceBound`: 204 when nothing waits; otherwise the oldest
/// message, locked to the caller for the lock timeout, its lock token in `ETag` and its
/// properties in `iothub-*` headers.
pub(crate) async fn receive(State(hub): State<Arc<Hub>>, Extension(d): Extension<HubDevice>) -> ApiResult<Response> {
    let Some(m) = hub.receive_c2d(&d).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let mut resp = (StatusCode::OK, m.body).into_response();
    let h = resp.headers_mut();
    let mut put = |name: String, value: &str| {
        if let (Ok(n), Ok(v)) = (header::HeaderName::try_from(name), HeaderValue::from_str(value)) {
            h.insert(n, v);
        }
    };
    put("etag".into(), &format!("\"{}\"", m.lock_token.as_deref().unwrap_or_default()));
    put("iothub-enqueuedtime".into(), &m.enqueued_time);
    put("iothub-deliverycount".into(), &m.delivery_count.to_string());
    put("iothub-expiry".into(), &fleetgate_core::time::Timestamp::from_unix_seconds(m.expiry).to_azure_string());
    for (name, value) in &m.properties.system {
        put(format!("iothub-{}", name.replace('-', "")), value);
    }
    for (name, value) in &m.properties.application {
        put(format!("iothub-app-{name}"), value);
    }
    Ok(resp)
}

/// A lock token as sent in a path: bare or as the quoted `ETag` it came in.
fn lock_token(raw: &str) -> &str {
    raw.trim_matches('"')
}

/// `DELETE /devices/{id}/messages/deviceBound/{etag}`: complete (204); with `?reject`, reject.
/// 412 when the lock was lost (it lapsed, or the message was settled).
pub(crate) async fn settle(
    State(hub): State<Arc<Hub>>,
    Extension(d): Extension<HubDevice>,
    Path((_, etag)): Path<(String, String)>,
    req: Request,
) -> ApiResult<StatusCode> {
    let reject = req.uri().query().unwrap_or("").split('&').any(|kv| kv.split('=').next() == Some("reject"));
    let how = if reject { C2dSettlement::Reject } else { C2dSettlement::Complete };
    hub.settle_c2d(&d, lock_token(&etag), how).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /devices/{id}/messages/deviceBound/{etag}/abandon`: back in the queue (204).
pub(crate) async fn abandon(
    State(hub): State<Arc<Hub>>,
    Extension(d): Extension<HubDevice>,
    Path((_, etag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    hub.settle_c2d(&d, lock_token(&etag), C2dSettlement::Abandon).await?;
    Ok(StatusCode::NO_CONTENT)
}
