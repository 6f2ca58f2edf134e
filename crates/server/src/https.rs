//! The HTTPS listener (port 443): the DPS and hub service REST APIs, DPS over HTTPS for devices,
//! and MQTT over WebSockets (see [`crate::websocket`]), routed by path on one TLS port.

use std::sync::Arc;

use axum::response::IntoResponse;
use axum::Router;
use fleetgate_core::{DpsError, ErrorCode};
use fleetgate_dps::service_api::{self, ApiError};
use fleetgate_dps::Provisioning;
use fleetgate_hub::Hub;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::Limits;
use crate::readiness::Readiness;

fn canonicalize<B>(mut req: http::Request<B>) -> http::Request<B> {
    let uri = req.uri();
    let path = fleetgate_rest::canonical_path(uri.path());
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
        .fallback(|| async { ApiError(DpsError::new(ErrorCode::NotFound, "No such resource.")).into_response() })
        .layer(axum::middleware::from_fn(close_when_body_refused))
}

/// A request refused before its body was read (401, 405, 413...) leaves the body in the
/// connection, so hyper closes the connection after the answer; saying so in the answer keeps a
/// client from reusing the connection and seeing a reset on its next request.
async fn close_when_body_refused(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let h = req.headers();
    let has_body = h.contains_key(http::header::TRANSFER_ENCODING)
        || h.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0");
    let mut resp = next.run(req).await;
    if has_body && resp.status().is_client_error() {
        resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    resp
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
            let mut resp = ApiError(DpsError::new(
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
pub async fn serve_metrics(listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let app = Router::new()
        .route("/metrics", axum::routing::get(|| async { metrics_text() }))
        .fallback(|| async { http::StatusCode::NOT_FOUND });
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::warn!(error = %e, "metrics listener failed");
    }
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    readiness: Arc<Readiness>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = app(dps.clone(), hub.clone(), readiness).merge(crate::websocket::router(
        dps,
        hub,
        limits.clone(),
        shutdown.clone(),
    ));
    let max = limits.max_connections;
    crate::listener::accept_loop(listener, "https", max, shutdown.clone(), move |tcp, peer, permit| {
        let (acceptor, app, limits, mut stop) = (acceptor.clone(), app.clone(), limits.clone(), shutdown.clone());
        async move {
            // Shared with the requests, so an upgraded WebSocket keeps the connection's slot.
            let permit = crate::websocket::ConnectionPermit(Arc::new(permit));
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
            let svc = TowerToHyperService::new(app.map_request(move |mut req: http::Request<_>| {
                req.extensions_mut().insert(permit.clone());
                // Who sent it: for the audit trail and the per-source limit on refusals.
                req.extensions_mut().insert(fleetgate_rest::ClientAddr(peer));
                if let Some(chain) = &client_chain {
                    req.extensions_mut().insert(chain.clone());
                }
                canonicalize(req)
            }));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.http_header_timeout)
                .max_buf_size(64 * 1024);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                // Shutdown: finish the request in flight, then close (idle keep-alives at once).
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "https connection error");
            }
        }
    })
    .await;
}
