//! What the DPS and hub service clients share: a TLS client trusting the given CA, a fresh SAS
//! token per request (as Azure's SDKs do), and Azure's error answers as [`Error`]s.

use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use reqwest::Method;
use serde_json::Value;

use crate::{ConnectionString, Error};

const TOKEN_TTL_SECS: i64 = 3600;

/// The service's `Retry-After` header, in seconds (the form Fleetgate and Azure send).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse().ok().map(std::time::Duration::from_secs)
}

/// Decodes a service answer into a typed result; a body of another shape is a protocol error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Protocol(format!("{what}: unexpected answer: {e}")))
}

pub(crate) struct RestClient {
    conn: ConnectionString,
    http: reqwest::Client,
    api_version: &'static str,
}

impl RestClient {
    pub(crate) fn new(conn: ConnectionString, ca_pem: Option<&[u8]>, api_version: &'static str) -> Result<Self, Error> {
        let mut b = reqwest::Client::builder().use_rustls_tls().connect_timeout(std::time::Duration::from_secs(15));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Tls { message: format!("reading the CA PEM: {e}"), source: Some(Box::new(e)) })?;
            if certs.is_empty() {
                return Err(Error::tls("the CA PEM holds no certificate"));
            }
            for cert in certs {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Self { conn, http: b.build().map_err(Error::from_request)?, api_version })
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
    ) -> Result<(reqwest::header::HeaderMap, Value), Error> {
        let resp = req.send().await.map_err(Error::from_request)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(Error::from_request)?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() {
            Ok((headers, value))
        } else {
            Err(Error::from_status(status.as_u16(), retry_after(&headers), value))
        }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(reqwest::header::HeaderMap, Value), Error> {
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
