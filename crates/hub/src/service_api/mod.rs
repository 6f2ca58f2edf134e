//! The hub service REST API (Azure IoT Hub data-plane shapes): device identities, twins, direct
//! methods; plus two Fleetgate endpoints for what Azure does over AMQP: sending cloud-to-device
//! messages and reading the telemetry stream (server-sent events).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, Path, Query, RawPathParams, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Router};
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::message::{Properties, TelemetryEvent};
use fleetgate_core::policy::{self, Right};
use fleetgate_core::sas::SasToken;
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::Twin;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_rest::{body, if_match, json, ApiError, ApiResult, RouteAccess};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::device_https::{self, DeviceCaller};
use crate::Hub;

mod c2d;
pub mod render;
mod requests;

/// The hub a service request is for, decided by its token's `sr`.
#[derive(Clone, Debug)]
pub struct TargetHub(pub String);

/// What a request was let in with, for a call that outlives its authorization (the event
/// stream): it must end when the same credentials would be refused.
#[derive(Clone, Debug)]
struct Caller {
    token: SasToken,
    /// The store key of the policies the token was checked against.
    policies: String,
    rights: &'static [Right],
}

impl Caller {
    /// When, on tokio's clock, the token stops being accepted.
    fn token_end(&self) -> tokio::time::Instant {
        let left = self.token.accepted_until().saturating_add(1).saturating_sub(Timestamp::now().unix_seconds());
        tokio::time::Instant::now() + Duration::from_secs(u64::try_from(left).unwrap_or(0))
    }

    /// Whether the request would still be let in: the token unexpired and signed with a current
    /// key of a policy that has the right. A renewed key or a removed policy ends what the old
    /// one opened; so does a store that cannot answer (the client reconnects and is checked).
    async fn still_authorized(&self, hub: &Hub) -> bool {
        if self.token.check_expiry(Timestamp::now().unix_seconds()).is_err() {
            return false;
        }
        match hub.store().policies(&self.policies).await {
            Ok(policies) => policy::authorize(&policies, &self.token, self.rights).is_ok(),
            Err(_) => false,
        }
    }
}

pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/devices", get(list_devices))
        .route("/devices/query", post(query_devices))
        .route("/statistics/devices", get(registry_statistics))
        .route("/statistics/service", get(service_statistics))
        .route("/devices/{id}", put(put_device).get(get_device).delete(delete_device))
        .route("/devices/{id}/messages/devicebound", post(send_c2d).get(device_https::receive))
        .route("/devices/{id}/messages/devicebound/{etag}", delete(device_https::settle))
        .route("/devices/{id}/messages/devicebound/{etag}/abandon", post(device_https::abandon))
        .route("/devices/{id}/messages/events", post(device_https::send_event))
        .route("/devices/{id}/commands", delete(c2d::purge))
        .route("/messages/servicebound/feedback", get(c2d::receive_feedback))
        .route("/messages/servicebound/feedback/{lock}", delete(c2d::complete_feedback))
        .route("/messages/servicebound/feedback/{lock}/abandon", post(c2d::abandon_feedback))
        .route("/twins/{id}", get(get_twin).patch(patch_twin).put(replace_twin))
        .route("/twins/{id}/methods", post(invoke_method))
        .route("/messages/events", get(events))
        .method_not_allowed_fallback(|| async {
            ApiError(AzureError::new(ErrorCode::MethodNotAllowed, "Method not allowed."))
        })
        .route_layer(middleware::from_fn_with_state(hub.clone(), authorize))
        .with_state(hub)
}

/// Every route and method of the hub service API with the rights it needs, as IoT Hub's policies
/// grant them: the registry (devices) needs registry read/write; twins are readable with registry
/// read or service connect and writable with service connect; methods, C2D and the event stream
/// need service connect; registry statistics need registry read, service statistics (connected
/// devices) service connect, the twin query what a twin read does; purging a device's queue and
/// reading C2D feedback need service connect. The device-facing routes
/// (telemetry and C2D receive over HTTPS) need `DeviceConnect`: the device's own credentials, or
/// a policy with that right acting for it. A route or method missing here is refused (405) after
/// authentication, never served.
pub const ACCESS: &[RouteAccess] = {
    use Right::{DeviceConnect as DC, RegistryRead as RR, RegistryWrite as RW, ServiceConnect as SC};
    const fn a(method: &'static str, route: &'static str, rights: &'static [Right], audited: bool) -> RouteAccess {
        RouteAccess { method, route, rights, audited }
    }
    &[
        a("GET", "/devices", &[RR], false),
        // The twin query reads twins: the rights of a twin read.
        a("POST", "/devices/query", &[RR, SC], false),
        a("GET", "/statistics/devices", &[RR], false),
        a("GET", "/statistics/service", &[SC], false),
        a("PUT", "/devices/{id}", &[RW], true),
        a("GET", "/devices/{id}", &[RR], false),
        a("DELETE", "/devices/{id}", &[RW], true),
        a("POST", "/devices/{id}/messages/devicebound", &[SC], true),
        a("DELETE", "/devices/{id}/commands", &[SC], true),
        a("GET", "/messages/servicebound/feedback", &[SC], false),
        a("DELETE", "/messages/servicebound/feedback/{lock}", &[SC], false),
        a("POST", "/messages/servicebound/feedback/{lock}/abandon", &[SC], false),
        a("GET", "/devices/{id}/messages/devicebound", &[DC], false),
        a("DELETE", "/devices/{id}/messages/devicebound/{etag}", &[DC], false),
        a("POST", "/devices/{id}/messages/devicebound/{etag}/abandon", &[DC], false),
        a("POST", "/devices/{id}/messages/events", &[DC], false),
        a("GET", "/twins/{id}", &[RR, SC], false),
        a("PATCH", "/twins/{id}", &[SC], true),
        // Replace twin: a change like PATCH, with the same rights.
        a("PUT", "/twins/{id}", &[SC], true),
        a("POST", "/twins/{id}/methods", &[SC], true),
        a("GET", "/messages/events", &[SC], false),
    ]
};

/// SAS with a policy of the hub the token's `sr` host names (any port); the rest of `sr` may
/// limit the token to a path. The matched route and method decide the right (see [`ACCESS`]);
/// changes, method calls and C2D sends are audited, refused or not.
async fn authorize(
    State(hub): State<Arc<Hub>>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut req: Request,
    next: Next,
) -> Response {
    let matched = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
    let access = fleetgate_rest::route_access(ACCESS, req.method(), matched).copied();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let target = params.ok().and_then(|p| p.iter().find(|(k, _)| *k == "id").map(|(_, v)| v.to_owned()));
    let target = target.unwrap_or_default();
    // Every refusal is in the audit trail, counted per source address (a flood of them is one
    // entry and one summary, not one row and one log line each).
    let source = fleetgate_rest::client_ip(&req);
    let refuse = |why: &str| {
        let entry = fleetgate_rest::service_audit_entry(&method, &path, "(unauthenticated)", &target, 401);
        hub.audit().refused(source, entry.reason(why));
        ApiError(AzureError::unauthorized()).into_response()
    };
    // The store could not be read: "retry later", not "unauthorized".
    let unavailable = || ApiError(AzureError::unavailable()).into_response();
    // A device route: the device itself (its SAS token or certificate), for its own id only.
    let device_route = access.is_some_and(|a| a.rights == [Right::DeviceConnect]);
    if device_route {
        match device_https::identify(&hub, &req, &target).await {
            DeviceCaller::Device(d) => {
                req.extensions_mut().insert(d);
                return next.run(req).await;
            }
            DeviceCaller::Policy => {}
            DeviceCaller::Refused => return ApiError(AzureError::unauthorized()).into_response(),
            DeviceCaller::CouldNotCheck => return unavailable(),
        }
    }
    let Some(token) =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|t| SasToken::parse(t).ok())
    else {
        return refuse("missing or malformed token");
    };
    if token.check_expiry(Timestamp::now().unix_seconds()).is_err() {
        return refuse("token expired");
    }
    let host = fleetgate_rest::token_host(&token.resource);
    let linked = match hub.hub_named(host).await {
        Ok(Some(linked)) => linked,
        Ok(None) => return refuse("token names no hub of this instance"),
        Err(_) => return unavailable(),
    };
    if !fleetgate_rest::token_covers(&token.resource, &path) {
        return refuse("token's resource does not cover this path");
    }
    let policies_key = format!("hub:{}", linked.host_name.to_ascii_lowercase());
    let Ok(policies) = hub.store().policies(&policies_key).await else {
        return unavailable();
    };
    // An unlisted route or method is refused below; authentication still comes first.
    let needed = access.map_or(&[][..], |a| a.rights);
    let name = match policy::authorize(&policies, &token, needed) {
        Ok(p) => p.key_name.clone(),
        Err(e) => return refuse(&e.to_string()),
    };
    let Some(access) = access else {
        return ApiError(AzureError::new(ErrorCode::MethodNotAllowed, "Method not allowed.")).into_response();
    };
    if device_route {
        match hub.acting_for(&linked.host_name, &target).await {
            Ok(d) => {
                req.extensions_mut().insert(d);
            }
            Err(e) => return ApiError(e).into_response(),
        }
    }
    req.extensions_mut().insert(TargetHub(linked.host_name));
    req.extensions_mut().insert(Caller { token, policies: policies_key, rights: access.rights });
    let resp = next.run(req).await;
    if access.audited {
        hub.audit().record(fleetgate_rest::service_audit_entry(&method, &path, &name, &target, resp.status().as_u16()));
    }
    resp
}

#[derive(Deserialize)]
struct ListQuery {
    top: Option<usize>,
}

/// The largest page of `GET /devices`.
const MAX_DEVICE_PAGE: usize = 1000;

/// `GET /devices?top=N`: up to `top` identities (1,000 by default and at most, as in Azure). When
/// more remain, `x-ms-continuation` says where the next page starts, so a client asking for more
/// than a page can follow it instead of getting a silently shortened list.
async fn list_devices(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let size = match q.top {
        None => 1000,
        Some(n) if n >= 1 => n.min(MAX_DEVICE_PAGE),
        Some(_) => return Err(AzureError::bad_request("top must be a positive integer.").into()),
    };
    let offset = fleetgate_rest::Page::from_headers(&headers)?.offset;
    let page = fleetgate_rest::Page { offset, size };
    let devices = hub.devices(&t.0, offset, size + 1).await?;
    let mut items = Vec::with_capacity(devices.len());
    for d in &devices {
        items.push(render::device(d, &hub.device_state(d).await?));
    }
    Ok(page.respond(items, "device"))
}

/// `POST /devices/query`: Azure's twin query (`az iot hub query`, the SDKs' `createQuery`), in
/// the subset of [`fleetgate_core::query`]: `SELECT * FROM devices`, optionally `WHERE` equality
/// conditions on the twin as `GET /twins/{id}` answers it (`deviceId`, `status`, `tags.x`,
/// `properties.reported.x`…), joined by `AND`; anything else is refused (400). Pages with
/// `x-ms-max-item-count` and `x-ms-continuation` like the other queries.
async fn query_devices(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let q = fleetgate_rest::query_spec(&body(b)?, "devices", false)?;
    if q.collection.is_none() {
        return Err(AzureError::bad_request("Unsupported query: use \"SELECT * FROM devices\".").into());
    }
    let page = fleetgate_rest::Page::from_headers(&headers)?;
    let (hub, name) = (&hub, &t.0);
    let items = fleetgate_rest::query_page(&q, &page, |offset, limit| async move {
        let twins = hub.twins(name, offset, limit).await?;
        let mut items = Vec::with_capacity(twins.len());
        for (d, t) in &twins {
            items.push(render::twin(d, t, &hub.device_state(d).await?));
        }
        Ok(items)
    })
    .await?;
    Ok(page.respond(items, "twin"))
}

/// `GET /statistics/devices`: `totalDeviceCount`, `enabledDeviceCount`, `disabledDeviceCount`.
async fn registry_statistics(State(hub): State<Arc<Hub>>, Extension(t): Extension<TargetHub>) -> ApiResult<Response> {
    Ok(json(render::registry_statistics(&hub.registry_statistics(&t.0).await?)))
}

/// `GET /statistics/service`: `connectedDeviceCount`.
async fn service_statistics(State(hub): State<Arc<Hub>>, Extension(t): Extension<TargetHub>) -> Response {
    json(render::service_statistics(hub.connected_devices(&t.0)))
}

async fn get_device(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (dev, _) = hub.twin(&t.0, &id).await?;
    Ok(json(render::device(&dev, &hub.device_state(&dev).await?)))
}

async fn put_device(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let spec = requests::device_spec(&body(b)?, &id)?;
    let dev = hub.put_device(&t.0, &id, spec, if_match(&headers)).await?;
    Ok(json(render::device(&dev, &hub.device_state(&dev).await?)))
}

async fn delete_device(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    hub.delete_device(&t.0, &id, if_match(&headers)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Azure's `Twin` of a device, with what the hub knows of it now.
async fn twin_answer(hub: &Hub, dev: &DeviceIdentity, twin: &Twin) -> ApiResult<Response> {
    Ok(json(render::twin(dev, twin, &hub.device_state(dev).await?)))
}

async fn get_twin(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (dev, twin) = hub.twin(&t.0, &id).await?;
    twin_answer(&hub, &dev, &twin).await
}

async fn patch_twin(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let change = requests::twin_change(&body(b)?)?;
    let (dev, twin) = hub.patch_twin(&t.0, &id, change, if_match(&headers)).await?;
    twin_answer(&hub, &dev, &twin).await
}

/// `PUT /twins/{id}`: Azure's replace twin (the service SDKs' `replace_twin`): the tags and
/// desired properties become the body's, etag-checked with `If-Match` like a patch.
async fn replace_twin(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let replacement = requests::twin_replacement(&body(b)?)?;
    let (dev, twin) = hub.replace_twin(&t.0, &id, replacement, if_match(&headers)).await?;
    twin_answer(&hub, &dev, &twin).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodRequest {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

async fn invoke_method(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: MethodRequest = serde_json::from_slice(&body(b)?)
        .map_err(|e| AzureError::bad_request(format!("Malformed method request: {e}")))?;
    // Azure accepts 5..=300 s and defaults to 30.
    let timeout = req.response_timeout_in_seconds.unwrap_or(30);
    if !(5..=300).contains(&timeout) {
        return Err(AzureError::bad_request("responseTimeoutInSeconds must be between 5 and 300.").into());
    }
    // How long to wait for the device to connect: 0 (it must be online already) to 300 s.
    let connect_timeout = req.connect_timeout_in_seconds.unwrap_or(0);
    if connect_timeout > 300 {
        return Err(AzureError::bad_request("connectTimeoutInSeconds must be between 0 and 300.").into());
    }
    let (connect_timeout, timeout) = (Duration::from_secs(connect_timeout), Duration::from_secs(timeout));
    let (status, payload) =
        hub.invoke_method(&t.0, &id, &req.method_name, req.payload, connect_timeout, timeout).await?;
    Ok(json(json!({"status": status, "payload": payload})))
}

/// `POST /devices/{id}/messages/deviceBound`: the body is the message; `iothub-messageid`,
/// `iothub-correlationid`, `iothub-userid`, `iothub-contenttype`, `iothub-contentencoding`,
/// `iothub-ttl` (seconds) and `iothub-app-{name}` headers set its properties; `iothub-ack`
/// (`none`, the default, `positive`, `negative`, `full`) the feedback it produces.
async fn send_c2d(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    let mut props = Properties::default();
    let mut ttl = None;
    let mut ack = fleetgate_core::feedback::AckMode::None;
    for (name, value) in &headers {
        let Ok(v) = value.to_str() else { continue };
        let n = name.as_str();
        let system = match n {
            "iothub-messageid" => Some("message-id"),
            "iothub-correlationid" => Some("correlation-id"),
            "iothub-userid" => Some("user-id"),
            "iothub-contenttype" => Some("content-type"),
            "iothub-contentencoding" => Some("content-encoding"),
            _ => None,
        };
        if let Some(s) = system {
            props.system.insert(s.to_owned(), v.to_owned());
        } else if n == "iothub-ttl" {
            ttl = Some(Duration::from_secs(
                v.trim().parse().map_err(|_| AzureError::bad_request("iothub-ttl must be whole seconds."))?,
            ));
        } else if n == "iothub-ack" {
            ack = fleetgate_core::feedback::AckMode::parse(v)
                .ok_or_else(|| AzureError::bad_request("iothub-ack must be none, positive, negative or full."))?;
        } else if let Some(app) = n.strip_prefix("iothub-app-") {
            props.application.insert(app.to_owned(), v.to_owned());
        }
    }
    let message_id = hub.send_c2d(&t.0, &id, props, b.to_vec(), ttl, ack).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = message_id.parse() {
        resp.headers_mut().insert("iothub-messageid", v);
    }
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventsQuery {
    /// First position to return; absent = only events appended from now on.
    from: Option<u64>,
    device_id: Option<String>,
    /// End the stream after this many seconds.
    timeout: Option<u64>,
    /// `json`: return what is stored from `from` as one array instead of a stream.
    format: Option<String>,
}

/// `GET /messages/events`: the hub's telemetry, as a server-sent event stream (or, with
/// `format=json`, one page). The stream ends when the caller's token expires or would no longer
/// be accepted (its policy's key renewed, the policy removed): it is checked before every page
/// of events it delivers.
async fn events(
    State(hub): State<Arc<Hub>>,
    Extension(t): Extension<TargetHub>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    let filter = q.device_id.clone();
    let keep = move |e: &TelemetryEvent| filter.as_deref().is_none_or(|d| d == e.device_id);
    if q.format.as_deref() == Some("json") {
        // Up to 10,000 events from `from` (a scan of the stream is bounded, so fewer may come
        // back; `from` = the last one's sequence number + 1 continues).
        let page = hub.events(&t.0, q.from.unwrap_or(0), 10_000).await?;
        return Ok(json(page.events.iter().filter(|e| keep(e)).map(render::event).collect::<Vec<_>>()));
    }
    // Subscribe before reading the tail so nothing appended in between is missed.
    let notices = hub.event_notifications();
    let start = match q.from {
        Some(f) => f,
        None => hub.last_event_seq().await? + 1,
    };
    let token_end = caller.token_end();
    let deadline =
        q.timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s)).map_or(token_end, |d| d.min(token_end));
    let caller = Arc::new(caller);
    let state = (hub, t.0, start, notices, std::collections::VecDeque::<TelemetryEvent>::new());
    let stream = futures_util::stream::unfold(state, move |(hub, name, mut pos, mut notices, mut buf)| {
        let (keep, caller) = (keep.clone(), caller.clone());
        async move {
            loop {
                if tokio::time::Instant::now() >= token_end {
                    return None;
                }
                if let Some(e) = buf.pop_front() {
                    let ev = Event::default().id(e.seq.to_string()).data(render::event(&e).to_string());
                    return Some((Ok::<_, std::convert::Infallible>(ev), (hub, name, pos, notices, buf)));
                }
                match hub.events(&name, pos, 256).await {
                    // Positions are shared by all hubs: a page can be empty yet move on.
                    Ok(page) if page.next > pos => {
                        if !page.events.is_empty() && !caller.still_authorized(&hub).await {
                            return None;
                        }
                        pos = page.next;
                        buf.extend(page.events.into_iter().filter(|e| keep(e)));
                        continue;
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
                let Ok(woke) = tokio::time::timeout_at(deadline, notices.recv()).await else {
                    return None;
                };
                // Lagging behind the notices is fine (we re-read the store); a closed channel
                // means the server is stopping.
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = woke {
                    return None;
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
