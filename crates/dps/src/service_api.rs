//! The DPS service REST API (Azure's data plane, api-version 2021-10-01 and older): enrollment
//! groups and registration records, authenticated with shared access policy tokens.
//!
//! Routes are declared lower-case; the HTTP front end folds the literal path segments of each
//! request to lower case first, since SDKs differ (`enrollmentGroups` vs `enrollmentgroups`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, Path, RawPathParams, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use fleetgate_core::policy::Right;
use fleetgate_core::{AzureError, ErrorCode};
pub use fleetgate_rest::ApiError;
use fleetgate_rest::{body, if_match, json, ApiResult, Page, RouteAccess};

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
        .route("/linkedhubs", get(list_linked_hubs))
        .route("/linkedhubs/{id}", put(put_linked_hub).delete(delete_linked_hub))
        .route("/policies", get(list_policies))
        .route("/policies/{id}/renewkey", post(renew_policy_key))
        .route("/audit", get(read_audit))
        .method_not_allowed_fallback(|| async {
            ApiError(AzureError::new(ErrorCode::MethodNotAllowed, "Method not allowed."))
        })
        .route_layer(middleware::from_fn_with_state(dps.clone(), authorize))
        .with_state(dps)
}

/// Every route and method of the DPS service API with the right it needs, as Azure's DPS policies
/// grant them: reads and queries need the read right of their collection, changes the write
/// right. A route or method missing here is refused (405) after authentication, never served.
pub const ACCESS: &[RouteAccess] = {
    use Right::{
        EnrollmentRead as ER, EnrollmentWrite as EW, RegistrationStatusRead as RR, RegistrationStatusWrite as RW,
        ServiceConfig as SC,
    };
    const fn a(method: &'static str, route: &'static str, rights: &'static [Right], audited: bool) -> RouteAccess {
        RouteAccess { method, route, rights, audited }
    }
    &[
        a("POST", "/enrollmentgroups/query", &[ER], false),
        a("PUT", "/enrollmentgroups/{id}", &[EW], true),
        a("GET", "/enrollmentgroups/{id}", &[ER], false),
        a("DELETE", "/enrollmentgroups/{id}", &[EW], true),
        a("POST", "/enrollmentgroups/{id}/attestationmechanism", &[ER], false),
        a("POST", "/enrollments", &[EW], true),
        a("POST", "/enrollments/query", &[ER], false),
        a("PUT", "/enrollments/{id}", &[EW], true),
        a("GET", "/enrollments/{id}", &[ER], false),
        a("DELETE", "/enrollments/{id}", &[EW], true),
        a("POST", "/enrollments/{id}/attestationmechanism", &[ER], false),
        a("GET", "/registrations/{id}", &[RR], false),
        a("DELETE", "/registrations/{id}", &[RW], true),
        a("POST", "/registrations/{id}/query", &[RR], false),
        // Fleetgate's admin routes (Azure's control plane): the instance's configuration, so
        // only a policy with `ServiceConfig` (the owner's) may read or change them.
        a("GET", "/linkedhubs", &[SC], false),
        a("PUT", "/linkedhubs/{id}", &[SC], true),
        a("DELETE", "/linkedhubs/{id}", &[SC], true),
        a("GET", "/policies", &[SC], false),
        a("POST", "/policies/{id}/renewkey", &[SC], true),
        a("GET", "/audit", &[SC], false),
    ]
};

/// Authenticates every call and checks the right its route and method need (see [`ACCESS`]);
/// every call that changes state is audited, refused or not.
async fn authorize(
    State(dps): State<Arc<Provisioning>>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let matched = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
    let access = fleetgate_rest::route_access(ACCESS, req.method(), matched).copied();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let source = fleetgate_rest::client_ip(&req);
    let target = params.ok().and_then(|p| p.iter().find(|(k, _)| *k == "id").map(|(_, v)| v.to_owned()));
    let target = target.unwrap_or_default();
    // An unlisted route or method is refused below; authentication still comes first.
    let needed = access.map_or(&[][..], |a| a.rights);
    match dps.authorize_service(auth, needed, &path).await {
        Ok(policy) => {
            let Some(access) = access else {
                return ApiError(AzureError::new(ErrorCode::MethodNotAllowed, "Method not allowed.")).into_response();
            };
            let resp = next.run(req).await;
            if access.audited {
                let status = resp.status().as_u16();
                dps.audit().record(fleetgate_rest::service_audit_entry(&method, &path, &policy, &target, status));
            }
            resp
        }
        Err(e) if e.status() == 401 => {
            let entry = fleetgate_rest::service_audit_entry(&method, &path, "(unauthenticated)", &target, 401);
            dps.audit().refused(source, entry.reason("SAS token refused"));
            ApiError(e).into_response()
        }
        Err(e) => ApiError(e).into_response(),
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

/// Queries are Azure's SQL-like language, in the subset of [`fleetgate_core::query`]: `*` (the
/// SDKs' default), `SELECT * FROM <collection>` and a `WHERE` clause (comparisons, `IN`/`NIN`,
/// `AND`/`OR`/`NOT`, parentheses) on the record as the API answers it (`provisioningStatus`,
/// `attestation.type`, `iotHubHostName`…). What the subset lacks is refused (400), never ignored.
fn check_query(b: &[u8], collection: &str) -> ApiResult<fleetgate_core::query::Query> {
    fleetgate_rest::query_spec(b, collection, false)
}

async fn query_groups(
    State(dps): State<Arc<Provisioning>>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let q = check_query(&body(b)?, "enrollmentgroups")?;
    let page = Page::from_headers(&headers)?;
    let groups: Vec<_> = dps.groups().await?.into_iter().map(|g| g.redacted()).collect();
    let groups = &groups;
    let items = fleetgate_rest::query_page(&q, &page, |offset, limit| async move {
        Ok(groups.iter().skip(offset).take(limit).collect::<Vec<_>>())
    })
    .await?;
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
    let q = check_query(&body(b)?, "enrollments")?;
    let page = Page::from_headers(&headers)?;
    let dps = &dps;
    let items = fleetgate_rest::query_page(&q, &page, |offset, limit| async move {
        Ok(dps.enrollments(offset, limit).await?.iter().map(|e| e.redacted()).collect::<Vec<_>>())
    })
    .await?;
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

/// `POST /registrations/{groupId}/query`: the group's records. The body is optional (Node sends
/// a query specification, others nothing); its `WHERE` conditions narrow the records (e.g.
/// `status = 'assigned'`). The route names the group, so the collection after `FROM` is not
/// checked: SDK samples name several.
async fn query_registrations(
    State(dps): State<Arc<Provisioning>>,
    Path(group_id): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let q = fleetgate_rest::query_spec(&body(b)?, "", true)?;
    let page = Page::from_headers(&headers)?;
    let (dps, group_id) = (&dps, &group_id);
    let items = fleetgate_rest::query_page(&q, &page, |offset, limit| async move {
        dps.registrations_of_group(group_id, offset, limit).await
    })
    .await?;
    Ok(page.respond(items, "deviceRegistration"))
}

/// `GET /linkedHubs`: the linked hubs and their allocation settings (no keys).
async fn list_linked_hubs(State(dps): State<Arc<Provisioning>>) -> ApiResult<Response> {
    Ok(json(dps.linked_hub_list().await?))
}

/// `PUT /linkedHubs/{hostName}`: links a hub, or changes a linked hub's allocation settings
/// (only that with `If-Match`: hubs have no etags, so any value means "it must exist"). The
/// answer carries the hub's `iothubowner` connection string, with the port this request
/// came in on (the hub's service API shares it).
async fn put_linked_hub(
    State(dps): State<Arc<Provisioning>>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    let (mut hub, key) = dps.put_linked_hub(&id, &b, if_match(&headers).is_some()).await?;
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
    let host = match authority.as_deref().and_then(port_of) {
        Some(port) if port != 443 => format!("{}:{port}", hub.name),
        _ => hub.name.clone(),
    };
    hub.connection_string = Some(format!("HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey={key}"));
    Ok(json(hub))
}

/// The port of a `Host` header or authority (`name:port`, `[v6]:port`), if it names one.
fn port_of(authority: &str) -> Option<u16> {
    let (host, port) = authority.rsplit_once(':')?;
    (!host.is_empty() && !port.contains(']')).then(|| port.parse().ok()).flatten()
}

async fn delete_linked_hub(State(dps): State<Arc<Provisioning>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    dps.delete_linked_hub(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /audit?since=&id=&outcome=&limit=`: the audit trail (attestation attempts, hub
/// connections, service-side changes), oldest first; under a limit, the newest that match.
async fn read_audit(State(dps): State<Arc<Provisioning>>, axum::extract::Query(q): QueryMap) -> ApiResult<Response> {
    use fleetgate_core::audit::{AuditQuery, Outcome};
    use fleetgate_core::time::Timestamp;
    let since = match q.get("since") {
        Some(s) => Some(Timestamp::parse_azure(s).ok_or_else(|| {
            ApiError(AzureError::bad_request(format!("since '{s}' is not a time (2026-11-28T14:00:00.0000000Z).")))
        })?),
        None => None,
    };
    let outcome = match q.get("outcome").map(String::as_str) {
        None => None,
        Some("success") => Some(Outcome::Success),
        Some("failure") => Some(Outcome::Failure),
        Some(o) => return Err(ApiError(AzureError::bad_request(format!("outcome '{o}' is not success or failure.")))),
    };
    let limit = match q.get("limit") {
        Some(l) => l.parse().map_err(|_| ApiError(AzureError::bad_request(format!("limit '{l}' is not a number."))))?,
        None => AUDIT_DEFAULT_LIMIT,
    };
    let query = AuditQuery { since, id: q.get("id").cloned(), outcome, limit };
    Ok(json(dps.audit_entries(&query).await?))
}

/// Entries `GET /audit` answers when no `limit` is given (`limit=0`: all).
const AUDIT_DEFAULT_LIMIT: usize = 1000;

type QueryMap = axum::extract::Query<std::collections::HashMap<String, String>>;

/// `GET /policies[?hub=H]`: the instance's policies (or hub H's), keys included (Azure's
/// `listKeys`).
async fn list_policies(State(dps): State<Arc<Provisioning>>, axum::extract::Query(q): QueryMap) -> ApiResult<Response> {
    Ok(json(dps.policy_list(q.get("hub").map(String::as_str)).await?))
}

/// `POST /policies/{keyName}/renewKey[?hub=H][&key=secondary]`: replaces the policy's primary
/// (default) or secondary key and answers the policy.
async fn renew_policy_key(
    State(dps): State<Arc<Provisioning>>,
    Path(id): Path<String>,
    axum::extract::Query(q): QueryMap,
) -> ApiResult<Response> {
    use crate::access_policies::KeyKind;
    let which = match q.get("key").map(String::as_str) {
        None | Some("primary") => KeyKind::Primary,
        Some("secondary") => KeyKind::Secondary,
        Some(k) => return Err(ApiError(AzureError::bad_request(format!("key '{k}' is not primary or secondary.")))),
    };
    Ok(json(dps.renew_policy_key(q.get("hub").map(String::as_str), &id, which).await?))
}
