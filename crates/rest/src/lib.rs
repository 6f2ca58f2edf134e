//! What the DPS and hub service APIs share, so each concept has one home: Azure's error
//! response, JSON responses with the content type SDKs check, body limits and paging headers.
#![forbid(unsafe_code)]

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetgate_core::time::Timestamp;
use fleetgate_core::{AzureError, ErrorCode};

/// Largest request body a service API reads.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Page size when the client sends no `x-ms-max-item-count`, and the most it may ask for.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// The largest continuation (an offset) accepted: far beyond any registry, and small enough that
/// an offset plus a page never overflows nor leaves the store's signed 64-bit range.
pub const MAX_CONTINUATION: usize = 1 << 48;

/// A [`AzureError`] as an HTTP response: Azure's JSON error body and `x-ms-error-code`.
pub struct ApiError(pub AzureError);

impl From<AzureError> for ApiError {
    fn from(e: AzureError) -> Self {
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

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON response with `Content-Type: application/json; charset=utf-8` (Node's HTTP clients
/// only parse bodies whose content type says JSON).
pub fn json(v: impl serde::Serialize) -> Response {
    let mut resp = Json(v).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    resp
}

/// The request body, or 413/400 in Azure's error shape.
pub fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    let too_large = || {
        AzureError::new(ErrorCode::PayloadTooLarge, format!("The request body is larger than {MAX_BODY_BYTES} bytes."))
    };
    let b = b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            AzureError::bad_request("The request body could not be read.")
        }
    })?;
    if b.len() > MAX_BODY_BYTES {
        return Err(too_large().into());
    }
    Ok(b)
}

pub fn if_match(headers: &HeaderMap) -> Option<String> {
    headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Paging as Azure does it: `x-ms-max-item-count` asks for a page size, `x-ms-continuation`
/// (opaque to clients; here an offset) resumes, and is returned while more items remain.
pub struct Page {
    pub offset: usize,
    pub size: usize,
}

impl Page {
    pub fn from_headers(h: &HeaderMap) -> ApiResult<Self> {
        let size = match h
            .get("x-ms-max-item-count")
            .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()))
        {
            None => DEFAULT_PAGE,
            Some(Some(n)) if n >= 1 => n.min(MAX_PAGE),
            Some(_) => return Err(AzureError::bad_request("x-ms-max-item-count must be a positive integer.").into()),
        };
        let offset =
            match h.get("x-ms-continuation").map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok())) {
                None => 0,
                Some(Some(n)) if n <= MAX_CONTINUATION => n,
                Some(_) => {
                    return Err(AzureError::bad_request("x-ms-continuation is not a valid continuation token.").into())
                }
            };
        Ok(Self { offset, size })
    }

    /// `items` holds up to `size + 1` entries starting at `offset`; the extra one only tells
    /// whether another page exists.
    pub fn respond<T: serde::Serialize>(&self, mut items: Vec<T>, item_type: &'static str) -> Response {
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

/// Parses the `query` of a query specification body (`{"query": "..."}`) for `collection`;
/// an empty body, or one without `query`, is `*` when `optional` (some SDKs send nothing).
/// What the subset does not support is refused (400) with the reason.
pub fn query_spec(b: &[u8], collection: &str, optional: bool) -> ApiResult<fleetgate_core::query::Query> {
    use fleetgate_core::query;
    let all = query::Query::all;
    if optional && b.iter().all(u8::is_ascii_whitespace) {
        return Ok(all());
    }
    let v: serde_json::Value = serde_json::from_slice(b)
        .map_err(|e| AzureError::bad_request(format!("Malformed query specification: {e}")))?;
    let q = match v.get("query") {
        Some(serde_json::Value::String(q)) => q,
        None if optional => return Ok(all()),
        _ => return Err(AzureError::bad_request("The query specification needs a 'query' string.").into()),
    };
    let q = query::parse(q).map_err(|e| AzureError::bad_request(format!("Unsupported query: {e}")))?;
    if !collection.is_empty() && !q.is_for(collection) {
        return Err(AzureError::bad_request(format!(
            "This query is for {collection}: use \"SELECT * FROM {collection}\"."
        ))
        .into());
    }
    Ok(q)
}

/// The page of `page` among the items `fetch` (offset, limit) reads in order that match `q`:
/// up to `page.size + 1` of them after skipping `page.offset` matches (the continuation counts
/// matches). Without conditions it is one read; with them the source is read in batches until
/// the page is full, so a selective query never holds more than a batch plus a page.
pub async fn query_page<T, F, Fut>(
    q: &fleetgate_core::query::Query,
    page: &Page,
    mut fetch: F,
) -> Result<Vec<serde_json::Value>, AzureError>
where
    F: FnMut(usize, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, AzureError>>,
    T: serde::Serialize,
{
    const BATCH: usize = 500;
    let to_json = |t: T| serde_json::to_value(t).map_err(|_| AzureError::internal());
    if q.filter.is_none() {
        return fetch(page.offset, page.size + 1).await?.into_iter().map(to_json).collect();
    }
    let (mut out, mut skipped, mut pos) = (Vec::new(), 0, 0);
    loop {
        let batch = fetch(pos, BATCH).await?;
        let n = batch.len();
        for item in batch {
            let v = to_json(item)?;
            if !q.matches(&v) {
                continue;
            }
            if skipped < page.offset {
                skipped += 1;
            } else {
                out.push(v);
                if out.len() > page.size {
                    return Ok(out);
                }
            }
        }
        if n < BATCH {
            return Ok(out);
        }
        pos += n;
    }
}

/// What one route and method of a service API needs: any one of `rights`, and whether a call is
/// written to the audit trail (every call that changes state or reaches a device is).
///
/// Rights are decided from the route the router matched (its template, e.g.
/// `/enrollmentgroups/{id}`) and the method, never from the text of the path: an id may equal any
/// route word (`/enrollmentgroups/query` as a group id is a PUT on `{id}`, a write).
#[derive(Debug, Clone, Copy)]
pub struct RouteAccess {
    pub method: &'static str,
    pub route: &'static str,
    pub rights: &'static [fleetgate_core::policy::Right],
    pub audited: bool,
}

/// The entry of `table` for the matched route and method; `None` (a route or method the table
/// does not list) means the call is not served.
pub fn route_access<'t>(table: &'t [RouteAccess], method: &Method, matched: Option<&str>) -> Option<&'t RouteAccess> {
    let matched = matched?;
    table.iter().find(|a| a.route == matched && a.method == method.as_str())
}

/// Folds the literal words of the routes to lower case where a route has them, leaving ids as
/// sent: SDKs disagree on the words' case (`enrollmentGroups` vs `enrollmentgroups`), routes are
/// declared in lower case, and ids are case-sensitive data — a device whose registration id is
/// `Events` or a device named `Query` keeps its id (its key is derived from it).
///
/// A word is folded only in a position where some route has it, after the words before it:
/// `/{enrollmentgroups|enrollments}/query`, `/{enrollmentgroups|enrollments}/{id}/attestationmechanism`,
/// `/registrations/{id}/query`, `/devices/{id}/messages/{devicebound|events}`,
/// `/devices/{id}/messages/devicebound/{etag}/abandon`, `/devices/{id}/commands`,
/// `/twins/{id}/methods`, `/messages/events`, `/messages/servicebound/feedback/{lock}/abandon`,
/// Fleetgate's `/linkedhubs`, `/policies/{id}/renewkey` and `/audit`, and the device API's
/// `/{scope}/registrations/...`.
///
/// Only ASCII case changes (the length stays); trailing slashes are [`trim_trailing_slashes`]'s.
pub fn canonical_path(path: &str) -> String {
    const FIRST: &[&str] = &[
        "enrollmentgroups",
        "enrollments",
        "registrations",
        "devices",
        "twins",
        "messages",
        "statistics",
        "linkedhubs",
        "policies",
        "audit",
    ];
    let mut segs: Vec<String> = path.split('/').map(str::to_owned).collect();
    let lower = |s: &str| s.to_ascii_lowercase();
    // segs[0] is the empty string before the leading '/'.
    let first = segs.get(1).map(|s| lower(s)).filter(|s| FIRST.contains(&s.as_str()));
    let fold = |segs: &mut Vec<String>, i: usize, words: &[&str]| {
        if let Some(s) = segs.get_mut(i) {
            let l = lower(s);
            if words.contains(&l.as_str()) {
                *s = l;
            }
        }
    };
    match first.as_deref() {
        Some(f) => {
            segs[1] = f.to_owned();
            match f {
                "enrollmentgroups" | "enrollments" => {
                    // `/enrollments/query` is the query route; `/enrollments/{id}/...` otherwise.
                    fold(&mut segs, 2, &["query"]);
                    if segs.len() > 3 {
                        fold(&mut segs, 3, &["attestationmechanism"]);
                    }
                }
                "registrations" => fold(&mut segs, 3, &["query"]),
                "devices" => {
                    fold(&mut segs, 3, &["messages", "commands"]);
                    if segs.get(3).is_some_and(|s| s == "messages") {
                        fold(&mut segs, 4, &["devicebound", "events"]);
                        if segs.get(4).is_some_and(|s| s == "devicebound") {
                            fold(&mut segs, 6, &["abandon"]);
                        }
                    }
                }
                "twins" => fold(&mut segs, 3, &["methods"]),
                "messages" => {
                    fold(&mut segs, 2, &["events", "servicebound"]);
                    if segs.get(2).is_some_and(|s| s == "servicebound") {
                        fold(&mut segs, 3, &["feedback"]);
                        fold(&mut segs, 5, &["abandon"]);
                    }
                }
                "statistics" => fold(&mut segs, 2, &["devices", "service"]),
                "policies" => fold(&mut segs, 3, &["renewkey"]),
                _ => {}
            }
        }
        // The device API: `/{scope}/registrations/{registrationId}/...`.
        None => fold(&mut segs, 2, &["registrations"]),
    }
    segs.join("/")
}

/// The path without its trailing slashes (`/` stays `/`), as Azure ignores them: the Node service
/// SDK lists devices with `GET /devices/`. The HTTPS front end applies it before routing, so the
/// rights are still decided by the matched route: `PUT /devices/x/` is `PUT /devices/{id}`.
pub fn trim_trailing_slashes(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" if path.starts_with('/') => "/",
        trimmed => trimmed,
    }
}

/// Whether a service token whose decoded `sr` is `resource` covers a request for `path` (the
/// percent-encoded request path). As in Azure, `sr` is the host, optionally followed by a path
/// that limits the token to the requests under it: `host/devices/d1` covers `/devices/d1` and
/// `/devices/d1/messages/devicebound`, not `/devices/d2` nor `/twins/d1`.
pub fn token_covers(resource: &str, path: &str) -> bool {
    let scope = resource.split_once('/').map_or("", |(_, p)| p);
    if scope.trim_matches('/').is_empty() {
        return true;
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    fleetgate_core::sas::resource_matches(&canonical_path(&format!("/{scope}")), &canonical_path(&decoded))
}

/// The address a request came from (the HTTPS front end puts it in every request's extensions),
/// for the audit trail and the per-source limit on refused authentications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// The address of the client that sent `req`, if the front end recorded it.
pub fn client_ip<B>(req: &axum::http::Request<B>) -> Option<std::net::IpAddr> {
    req.extensions().get::<ClientAddr>().map(|a| a.0.ip())
}

/// The host a service token's `sr` names: its first path segment, without a `:port` and without
/// IPv6 brackets (clients sign `host`, `host:port` or `[::1]:port` alike).
pub fn token_host(resource: &str) -> &str {
    let host = resource.split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The audit entry of a service API call: operation `METHOD /path`, the policy as actor, the
/// resource id as target, the outcome from the status.
pub fn service_audit_entry(
    method: &axum::http::Method,
    path: &str,
    policy: &str,
    target: &str,
    status: u16,
) -> fleetgate_core::audit::AuditEntry {
    use fleetgate_core::audit::{AuditCategory, AuditEntry, Outcome};
    let outcome = if status < 400 { Outcome::Success } else { Outcome::Failure };
    AuditEntry::new(AuditCategory::ServiceOperations, &format!("{method} {path}"), policy, outcome)
        .target(target)
        .status(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hosts() {
        assert_eq!(token_host("localhost"), "localhost");
        assert_eq!(token_host("localhost:8443"), "localhost");
        assert_eq!(token_host("LocalHost:8443/devices/x"), "LocalHost");
        assert_eq!(token_host("[::1]:443"), "::1");
        // A bare IPv6 address is ambiguous with a port; clients bracket it, as in a URL.
        assert_eq!(token_host("[::1]"), "::1");
        assert_eq!(token_host(""), "");
    }

    #[test]
    fn continuations() {
        let page = |c: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-ms-continuation", HeaderValue::from_str(c).unwrap());
            Page::from_headers(&h).map(|p| p.offset).map_err(|e| e.0.status())
        };
        assert_eq!(page("200"), Ok(200));
        assert_eq!(page(&MAX_CONTINUATION.to_string()), Ok(MAX_CONTINUATION));
        // Past the bound, including usize::MAX, which wrapped into the first page.
        assert_eq!(page(&(MAX_CONTINUATION + 1).to_string()), Err(400));
        assert_eq!(page("18446744073709551615"), Err(400));
        assert_eq!(page("-1"), Err(400));
        assert_eq!(page("abc"), Err(400));
    }

    #[test]
    fn token_scopes() {
        assert!(token_covers("localhost", "/devices/d1"));
        assert!(token_covers("localhost:8443/", "/devices/d1"));
        assert!(token_covers("localhost/devices", "/devices/d1"));
        assert!(token_covers("localhost/devices/d1", "/devices/d1"));
        assert!(token_covers("localhost/Devices/d1", "/devices/d1/messages/deviceBound"));
        assert!(token_covers("localhost/devices/a b", "/devices/a%20b"));
        assert!(!token_covers("localhost/devices/other", "/devices/d1"));
        assert!(!token_covers("localhost/devices/d", "/devices/d1"));
        assert!(!token_covers("localhost/devices/d1", "/twins/d1"));
        assert!(!token_covers("localhost/devices/d1", "/devices"));
        assert!(!token_covers("localhost/registrations/xyz", "/enrollmentgroups/g"));
        assert!(!token_covers("localhost/registrations/xyz", "/registrations/abc"));
    }

    #[test]
    fn folds_literals_keeps_ids() {
        assert_eq!(canonical_path("/enrollmentGroups/MyGroup"), "/enrollmentgroups/MyGroup");
        assert_eq!(canonical_path("/EnrollmentGroups/query"), "/enrollmentgroups/query");
        assert_eq!(canonical_path("/registrations/Dev-1/Query"), "/registrations/Dev-1/query");
        assert_eq!(canonical_path("/devices/Dev-1/messages/deviceBound"), "/devices/Dev-1/messages/devicebound");
        assert_eq!(canonical_path("/Twins/Dev-1/Methods"), "/twins/Dev-1/methods");
        assert_eq!(canonical_path("/Messages/Events"), "/messages/events");
        assert_eq!(canonical_path("/linkedHubs/Hub-B.example"), "/linkedhubs/Hub-B.example");
        assert_eq!(canonical_path("/Policies/MyPolicy/renewKey"), "/policies/MyPolicy/renewkey");
        assert_eq!(canonical_path("/Audit"), "/audit");
        assert_eq!(canonical_path("/Enrollments/G/AttestationMechanism"), "/enrollments/G/attestationmechanism");
        assert_eq!(
            canonical_path("/0ne00000001/Registrations/Dev-1/register"),
            "/0ne00000001/registrations/Dev-1/register"
        );
    }

    #[test]
    fn trailing_slashes_are_trimmed() {
        let c = |p: &str| canonical_path(trim_trailing_slashes(p));
        assert_eq!(c("/devices/"), "/devices");
        assert_eq!(c("/Devices/Dev-1/"), "/devices/Dev-1");
        assert_eq!(c("/enrollmentGroups/query/"), "/enrollmentgroups/query");
        assert_eq!(c("/Statistics/Devices/"), "/statistics/devices");
        assert_eq!(c("/devices//"), "/devices");
        assert_eq!(c("/"), "/");
        assert_eq!(c("//"), "/");
        assert_eq!(c("/devices/x"), "/devices/x");
    }

    /// Ids that spell a route word keep their case: they are data (a device key is derived from
    /// the registration id as sent).
    #[test]
    fn ids_that_spell_route_words_keep_their_case() {
        assert_eq!(
            canonical_path("/0ne00000001/registrations/Events/register"),
            "/0ne00000001/registrations/Events/register"
        );
        assert_eq!(canonical_path("/0ne00000001/registrations/Query"), "/0ne00000001/registrations/Query");
        assert_eq!(canonical_path("/devices/Query"), "/devices/Query");
        assert_eq!(canonical_path("/devices/Twins/messages/DeviceBound"), "/devices/Twins/messages/devicebound");
        assert_eq!(canonical_path("/enrollmentGroups/Devices"), "/enrollmentgroups/Devices");
        assert_eq!(canonical_path("/twins/Methods"), "/twins/Methods");
        assert_eq!(canonical_path("/registrations/Events/Query"), "/registrations/Events/query");
        // The query routes are still folded: `Query` there is the route, as before.
        assert_eq!(canonical_path("/EnrollmentGroups/Query"), "/enrollmentgroups/query");
    }

    #[test]
    fn audit_entries() {
        let e = service_audit_entry(&axum::http::Method::PUT, "/devices/d1", "iothubowner", "d1", 412);
        assert_eq!(e.operation, "PUT /devices/d1");
        assert_eq!(e.outcome, fleetgate_core::audit::Outcome::Failure);
        assert_eq!((e.target.as_deref(), e.status), (Some("d1"), Some(412)));
    }
}
