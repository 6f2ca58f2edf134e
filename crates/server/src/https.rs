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

/// Literal path segments matched case-insensitively: SDKs disagree on their case
/// (`enrollmentGroups` vs `enrollmentgroups`). Routes are declared in lower case.
const LITERAL_SEGMENTS: &[&str] = &[
    "enrollmentgroups",
    "enrollments",
    "registrations",
    "query",
    "attestationmechanism",
    "devices",
    "twins",
    "methods",
    "messages",
    "devicebound",
    "events",
];

/// Folds the known literal segments of `path` to lower case; ids are left as sent.
pub fn canonical_path(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            let lower = seg.to_ascii_lowercase();
            if LITERAL_SEGMENTS.contains(&lower.as_str()) {
                lower
            } else {
                seg.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn canonicalize<B>(mut req: http::Request<B>) -> http::Request<B> {
    let uri = req.uri();
    let path = canonical_path(uri.path());
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

pub fn app(dps: Arc<Provisioning>, hub: Arc<Hub>) -> Router {
    let store = dps.store().clone();
    Router::new()
        // Liveness: the process answers. Readiness: the store answers too.
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let store = store.clone();
                async move {
                    match store.setting("id_scope").await {
                        Ok(Some(_)) => (http::StatusCode::OK, "ready"),
                        _ => (http::StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(|| async {
                (
                    [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    fleetgate_metrics::METRICS.render(),
                )
            }),
        )
        .merge(service_api::router(dps.clone()))
        .merge(fleetgate_dps::device_api::device_router(dps))
        .merge(fleetgate_hub::service_api::router(hub))
        .fallback(|| async { ApiError(DpsError::new(ErrorCode::NotFound, "No such resource.")).into_response() })
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = app(dps.clone(), hub.clone()).merge(crate::websocket::router(dps, hub, limits.clone(), shutdown.clone()));
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

#[cfg(test)]
mod tests {
    use super::canonical_path;

    #[test]
    fn folds_literals_keeps_ids() {
        assert_eq!(canonical_path("/enrollmentGroups/MyGroup"), "/enrollmentgroups/MyGroup");
        assert_eq!(canonical_path("/EnrollmentGroups/query"), "/enrollmentgroups/query");
        assert_eq!(canonical_path("/registrations/Dev-1/Query"), "/registrations/Dev-1/query");
        assert_eq!(canonical_path("/devices/Dev-1/messages/deviceBound"), "/devices/Dev-1/messages/devicebound");
    }
}
