//! The HTTPS listener (port 443): the DPS and hub service REST APIs, DPS over HTTPS for devices,
//! and MQTT over WebSockets (see [`crate::websocket`]), routed by path on one TLS port.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::IntoResponse;
use axum::Router;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_dps::service_api::{self, ApiError};
use fleetgate_dps::Provisioning;
use fleetgate_hub::Hub;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::Limits;
use crate::readiness::Readiness;

fn canonicalize<B>(mut req: http::Request<B>) -> http::Request<B> {
    let uri = req.uri();
    let path = fleetgate_rest::canonical_path(fleetgate_rest::trim_trailing_slashes(uri.path()));
    if path != uri.path() {
        let pq = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = uri.clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(u) = http::Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
    }
    req
}

/// Serves a hyper connection to its end; at shutdown (`stop` changes), finishes the request in
/// flight, then closes (idle keep-alives at once). A macro: hyper's HTTP/1 connection with and
/// without upgrades share `graceful_shutdown` by name only, not through a trait.
macro_rules! until_stopped {
    ($conn:expr, $stop:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = $stop.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

pub fn app(dps: Arc<Provisioning>, hub: Arc<Hub>, readiness: Arc<Readiness>) -> Router {
    // Every route that checks credentials first turns away a source that failed too often.
    let admit = axum::middleware::from_fn_with_state(dps.audit().clone(), admit_source);
    Router::new()
        // Liveness: the process answers. Readiness: a registration could be taken now.
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let readiness = readiness.clone();
                async move {
                    match readiness.check().await {
                        Ok(()) => (http::StatusCode::OK, "ready".to_owned()),
                        Err(why) => (http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
                    }
                }
            }),
        )
        .merge(
            Router::new()
                .route("/metrics", axum::routing::get(authorized_metrics))
                .with_state(dps.clone())
                .layer(admit.clone()),
        )
        .merge(service_api::router(dps.clone()).layer(admit.clone()))
        .merge(fleetgate_dps::device_api::device_router(dps).layer(admit.clone()))
        .merge(fleetgate_hub::service_api::router(hub).layer(admit))
        .fallback(|| async { ApiError(AzureError::new(ErrorCode::NotFound, "No such resource.")).into_response() })
}

/// A source that failed authentication too often is answered 429 + `Retry-After` without a
/// credential check until its backoff ends (see [`fleetgate_store::AuditLog::admit`]).
async fn admit_source(
    axum::extract::State(audit): axum::extract::State<fleetgate_store::AuditLog>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match audit.admit(fleetgate_rest::client_ip(&req)) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let mut resp = ApiError(AzureError::new(
                ErrorCode::Throttled,
                "Too many failed authentications from this address; retry later.",
            ))
            .into_response();
            let secs = fleetgate_core::throttle::retry_after_secs(wait);
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
            resp
        }
    }
}

/// The metrics in the OpenMetrics text format.
fn metrics_text() -> axum::response::Response {
    (
        [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        fleetgate_metrics::METRICS.render(),
    )
        .into_response()
}

/// `/metrics` on the HTTPS port: counts of registrations and connections are not for strangers,
/// so it takes a SAS token of a DPS policy with the `ServiceConfig` right (the owner policy) or
/// the `RegistrationStatusRead` right (enough for a Prometheus: it reads, like a status read).
/// Prometheus sends one with `authorization: {type: SharedAccessSignature, credentials: "sr=…"}`.
async fn authorized_metrics(
    axum::extract::State(dps): axum::extract::State<Arc<Provisioning>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use fleetgate_core::policy::Right;
    let auth = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match dps.authorize_service(auth, &[Right::ServiceConfig, Right::RegistrationStatusRead], "/metrics").await {
        Ok(_) => metrics_text(),
        Err(e) => {
            if e.status() == 401 {
                use fleetgate_core::audit::{AuditCategory, AuditEntry, Outcome};
                let refusal = AuditEntry::new(
                    AuditCategory::ServiceOperations,
                    "GET /metrics",
                    "(unauthenticated)",
                    Outcome::Failure,
                )
                .reason("SAS token refused")
                .status(401);
                dps.audit().refused(fleetgate_rest::client_ip(&req), refusal);
            }
            ApiError(e).into_response()
        }
    }
}

/// The plain-HTTP `/metrics` listener (`--metrics-listen`): no TLS and no credentials, for a
/// Prometheus on a private network. Nothing else is served on it.
/// The plain-HTTP `/metrics` listener (`--metrics-listen`): no credentials, so it takes the same
/// connection gate (the process's cap and the per-source cap) and the same header, idle and write
/// timeouts as the device ports — a slow client cannot hold descriptors the devices need.
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    limits: Arc<Limits>,
    gate: Arc<crate::listener::Gate>,
    shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", axum::routing::get(|| async { metrics_text() }))
        .fallback(|| async { http::StatusCode::NOT_FOUND });
    crate::listener::accept_loop(listener, "metrics", gate, shutdown.clone(), move |tcp, peer, _permit| {
        let (app, limits, mut stop) = (app.clone(), limits.clone(), shutdown.clone());
        async move {
            let tcp = crate::write_deadline::WriteDeadline::new(tcp, limits.write_timeout);
            let conn = http1(&limits, 16 * 1024).serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app));
            if let Err(e) = until_stopped!(conn, stop) {
                tracing::debug!(%peer, error = %e, "metrics connection error");
            }
        }
    })
    .await;
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    readiness: Arc<Readiness>,
    limits: Arc<Limits>,
    gate: Arc<crate::listener::Gate>,
    budget: Arc<crate::mqtt::PacketBudget>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tls = (*tls).clone();
    // HTTP/1.1 only, here and in the connection below: no SDK speaks HTTP/2 to DPS or the hub,
    // and HTTP/2 would bring its own idle and stream limits to get right.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = app(dps.clone(), hub.clone(), readiness).merge(crate::websocket::router(
        dps,
        hub,
        limits.clone(),
        budget,
        shutdown.clone(),
    ));
    crate::listener::accept_loop(listener, "https", gate, shutdown.clone(), move |tcp, peer, permit| {
        let (acceptor, app, limits, mut stop) = (acceptor.clone(), app.clone(), limits.clone(), shutdown.clone());
        async move {
            // Shared with the requests, so an upgraded WebSocket keeps the connection's slot.
            let permit = crate::websocket::ConnectionPermit(Arc::new(permit));
            let tcp = crate::write_deadline::WriteDeadline::new(tcp, limits.write_timeout);
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // An X.509 device's chain, for DPS over HTTPS and MQTT over WebSockets.
            let client_chain = crate::tls::peer_certificates(tls.get_ref().1);
            let body_timeout = limits.http_body_timeout;
            let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut req = canonicalize(req);
                req.extensions_mut().insert(permit.clone());
                // Who sent it: for the audit trail and the per-source limit on refusals.
                req.extensions_mut().insert(fleetgate_rest::ClientAddr(peer));
                if let Some(chain) = &client_chain {
                    req.extensions_mut().insert(chain.clone());
                }
                let state = Arc::new(BodyState::default());
                let req = req.map(|b| deadline_body(b, body_timeout, state.clone()));
                let answer = app.clone().oneshot(req);
                async move { answer.await.map(|resp| connection_rules(resp, &state)) }
            });
            let conn = http1(&limits, 64 * 1024)
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc))
                .with_upgrades();
            if let Err(e) = until_stopped!(conn, stop) {
                tracing::debug!(%peer, error = %e, "https connection error");
            }
        }
    })
    .await;
}

/// hyper's HTTP/1 connection, not the auto-detecting one: that one waits, without a limit, for the
/// first bytes to tell HTTP/1 from HTTP/2 (a silent connection was held for good) and would serve
/// HTTP/2 to a client that skips ALPN. The header timeout is counted from the connection's start
/// and from each response's end alike: it is the limit for a request's headers and for an idle
/// keep-alive connection.
fn http1(limits: &Limits, max_buf: usize) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout)
        .max_buf_size(max_buf);
    builder
}

/// The request body as the app reads it: whole within `timeout` of the request's headers, however
/// slowly it trickles in; `state` tells the connection whether the deadline passed and whether the
/// body was read to its end.
fn deadline_body(body: hyper::body::Incoming, timeout: Duration, state: Arc<BodyState>) -> axum::body::Body {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        state.read_to_end.store(true, Ordering::Relaxed);
        return axum::body::Body::new(body);
    }
    axum::body::Body::new(DeadlineBody { inner: body, sleep: Box::pin(tokio::time::sleep(timeout)), state })
}

/// What the connection learns of a request's body while the app reads it.
#[derive(Default)]
struct BodyState {
    /// The deadline passed before the body arrived.
    expired: AtomicBool,
    /// The body was read to its end (or there was none).
    read_to_end: AtomicBool,
}

/// What the connection adds to the app's answer: a body that missed its deadline is answered
/// 408 whatever the handler made of the unreadable body. An answer given without reading the
/// request's body to its end (a refusal before authentication, a handler that ignores a body, a
/// 408) says `Connection: close`: hyper closes such a connection after the answer, and a client
/// that reused it would see its next request fail unanswered.
fn connection_rules(mut resp: axum::response::Response, body: &BodyState) -> axum::response::Response {
    if body.expired.load(Ordering::Relaxed) {
        resp = ApiError(AzureError::new(ErrorCode::RequestTimeout, "The request body did not arrive in time."))
            .into_response();
    }
    if !body.read_to_end.load(Ordering::Relaxed) || resp.status() == http::StatusCode::REQUEST_TIMEOUT {
        resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    resp
}

/// A request body with a total deadline (see [`deadline_body`]).
struct DeadlineBody {
    inner: hyper::body::Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    state: Arc<BodyState>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl hyper::body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.state.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || hyper::body::Body::is_end_stream(&self.inner) {
            self.state.read_to_end.store(true, Ordering::Relaxed);
        }
        frame.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
