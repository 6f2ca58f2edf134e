//! What the DPS and hub service clients share: a TLS client trusting the given CA, a fresh SAS
//! token per request (as Azure's SDKs do), and Azure's error bodies as typed errors.

use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use reqwest::Method;
use serde_json::Value;

use crate::ConnectionString;

const TOKEN_TTL_SECS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The service answered with an error: status and Azure's error body.
    #[error("{status}: {body}")]
    Api { status: u16, body: Value },
    #[error("request failed: {0}")]
    Transport(String),
}

impl ServiceError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ServiceError::Api { status, .. } => Some(*status),
            ServiceError::Transport(_) => None,
        }
    }
}

/// A request that got no answer, with its whole cause chain: reqwest's own line ("error
/// sending request for url (...)") is the same for a refused connection, an untrusted
/// certificate and an unknown host; the causes say which.
pub(crate) fn transport(e: impl std::error::Error) -> ServiceError {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let line = c.to_string();
        // Layers often repeat the message below them word for word.
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    ServiceError::Transport(text)
}

pub(crate) struct RestClient {
    conn: ConnectionString,
    http: reqwest::Client,
    api_version: &'static str,
}

impl RestClient {
    pub(crate) fn new(
        conn: ConnectionString,
        ca_pem: Option<&[u8]>,
        api_version: &'static str,
    ) -> Result<Self, ServiceError> {
        let mut b = reqwest::Client::builder().use_rustls_tls().connect_timeout(std::time::Duration::from_secs(15));
        if let Some(pem) = ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(transport)? {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Self { conn, http: b.build().map_err(transport)?, api_version })
    }

    fn token(&self) -> String {
        let expiry = Timestamp::now().unix_seconds() + TOKEN_TTL_SECS;
        build_token(&self.conn.key, &self.conn.host_name, expiry, Some(&self.conn.key_name))
    }

    /// An authorized request for `path` (which may already carry a query).
    pub(crate) fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("https://{}{path}{sep}api-version={}", self.conn.host_name, self.api_version);
        self.http.request(method, url).header("Authorization", self.token()).header("Accept", "application/json")
    }

    /// Sends and decodes: a JSON value (or `Null` for an empty body) on success, Azure's error
    /// body otherwise.
    pub(crate) async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::header::HeaderMap, Value), ServiceError> {
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(transport)?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() {
            Ok((headers, value))
        } else {
            Err(ServiceError::Api { status: status.as_u16(), body: value })
        }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(reqwest::header::HeaderMap, Value), ServiceError> {
        let mut req = self.request(method, path);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }
}
