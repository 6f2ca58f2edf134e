//! A client of the DPS service REST API, authenticating like Azure's SDKs: a fresh SAS token
//! per request, signed with a shared access policy key.

use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use percent_encoding::utf8_percent_encode;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::ConnectionString;

pub const API_VERSION: &str = "2021-10-01";
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

pub struct DpsServiceClient {
    conn: ConnectionString,
    http: reqwest::Client,
}

/// One page of a query and the token for the next.
pub struct Page {
    pub items: Vec<Value>,
    pub continuation: Option<String>,
}

fn seg(s: &str) -> String {
    utf8_percent_encode(s, fleetgate_core::sas::URI_COMPONENT).to_string()
}

impl DpsServiceClient {
    /// `ca_pem`: the CA that signed the server's certificate (Fleetgate's `ca.pem`).
    pub fn new(conn: ConnectionString, ca_pem: Option<&[u8]>) -> Result<Self, ServiceError> {
        let mut b = reqwest::Client::builder().use_rustls_tls().timeout(std::time::Duration::from_secs(30));
        if let Some(pem) = ca_pem {
            for cert in
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ServiceError::Transport(e.to_string()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Self { conn, http: b.build().map_err(|e| ServiceError::Transport(e.to_string()))? })
    }

    fn token(&self) -> String {
        let expiry = Timestamp::now().unix_seconds() + TOKEN_TTL_SECS;
        build_token(&self.conn.key, &self.conn.host_name, expiry, Some(&self.conn.key_name))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(reqwest::header::HeaderMap, Value), ServiceError> {
        let url = format!("https://{}{path}?api-version={API_VERSION}", self.conn.host_name);
        let mut req =
            self.http.request(method, url).header("Authorization", self.token()).header("Accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| ServiceError::Transport(e.to_string()))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| ServiceError::Transport(e.to_string()))?;
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

    pub async fn put_enrollment_group(&self, group: &Value, if_match: Option<&str>) -> Result<Value, ServiceError> {
        let id = group.get("enrollmentGroupId").and_then(Value::as_str).unwrap_or_default();
        let headers: Vec<_> = if_match.map(|e| ("If-Match", e.to_owned())).into_iter().collect();
        Ok(self.call(Method::PUT, &format!("/enrollmentGroups/{}", seg(id)), Some(group), &headers).await?.1)
    }

    pub async fn get_enrollment_group(&self, id: &str) -> Result<Value, ServiceError> {
        Ok(self.call(Method::GET, &format!("/enrollmentGroups/{}", seg(id)), None, &[]).await?.1)
    }

    pub async fn enrollment_group_attestation(&self, id: &str) -> Result<Value, ServiceError> {
        Ok(self.call(Method::POST, &format!("/enrollmentGroups/{}/attestationmechanism", seg(id)), None, &[]).await?.1)
    }

    pub async fn delete_enrollment_group(&self, id: &str, if_match: Option<&str>) -> Result<(), ServiceError> {
        let headers: Vec<_> = if_match.map(|e| ("If-Match", e.to_owned())).into_iter().collect();
        self.call(Method::DELETE, &format!("/enrollmentGroups/{}", seg(id)), None, &headers).await.map(|_| ())
    }

    async fn query(
        &self,
        path: &str,
        body: Value,
        page_size: Option<usize>,
        continuation: Option<&str>,
    ) -> Result<Page, ServiceError> {
        let mut headers = Vec::new();
        if let Some(n) = page_size {
            headers.push(("x-ms-max-item-count", n.to_string()));
        }
        if let Some(c) = continuation {
            headers.push(("x-ms-continuation", c.to_owned()));
        }
        let (h, v) = self.call(Method::POST, path, Some(&body), &headers).await?;
        let items = match v {
            Value::Array(a) => a,
            other => return Err(ServiceError::Transport(format!("query returned a non-array: {other}"))),
        };
        let continuation = h.get("x-ms-continuation").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Page { items, continuation })
    }

    /// Every enrollment group, following continuation tokens.
    pub async fn list_enrollment_groups(&self) -> Result<Vec<Value>, ServiceError> {
        self.collect("/enrollmentGroups/query".into(), serde_json::json!({"query": "SELECT * FROM enrollmentGroups"}))
            .await
    }

    /// Every registration record of a group, following continuation tokens.
    pub async fn list_registrations(&self, group_id: &str) -> Result<Vec<Value>, ServiceError> {
        self.collect(
            format!("/registrations/{}/query", seg(group_id)),
            serde_json::json!({"query": "SELECT * FROM registrations"}),
        )
        .await
    }

    async fn collect(&self, path: String, body: Value) -> Result<Vec<Value>, ServiceError> {
        let mut all = Vec::new();
        let mut cont: Option<String> = None;
        loop {
            let page = self.query(&path, body.clone(), Some(100), cont.as_deref()).await?;
            all.extend(page.items);
            match page.continuation {
                Some(c) => cont = Some(c),
                None => return Ok(all),
            }
        }
    }

    pub async fn get_registration(&self, id: &str) -> Result<Value, ServiceError> {
        Ok(self.call(Method::GET, &format!("/registrations/{}", seg(id)), None, &[]).await?.1)
    }

    pub async fn delete_registration(&self, id: &str) -> Result<(), ServiceError> {
        self.call(Method::DELETE, &format!("/registrations/{}", seg(id)), None, &[]).await.map(|_| ())
    }
}

/// True when an error is the service saying "not found".
pub fn is_not_found(e: &ServiceError) -> bool {
    e.status() == Some(StatusCode::NOT_FOUND.as_u16())
}
