//! A client of the DPS service REST API, authenticating like Azure's SDKs: a fresh SAS token
//! per request, signed with a shared access policy key.

use percent_encoding::utf8_percent_encode;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::ConnectionString;

pub const API_VERSION: &str = "2021-10-01";

use crate::rest::RestClient;
pub use crate::rest::ServiceError;

pub struct DpsServiceClient {
    rest: RestClient,
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
        Ok(Self { rest: RestClient::new(conn, ca_pem, API_VERSION)? })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(reqwest::header::HeaderMap, Value), ServiceError> {
        self.rest.call(method, path, body, headers).await
    }

    /// Whether the server answers its liveness probe, `GET /healthz`.
    pub async fn healthz(&self) -> Result<(), ServiceError> {
        self.rest.call(Method::GET, "/healthz", None, &[]).await.map(|_| ())
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

    pub async fn put_enrollment(&self, enrollment: &Value, if_match: Option<&str>) -> Result<Value, ServiceError> {
        let id = enrollment.get("registrationId").and_then(Value::as_str).unwrap_or_default();
        let headers: Vec<_> = if_match.map(|e| ("If-Match", e.to_owned())).into_iter().collect();
        Ok(self.call(Method::PUT, &format!("/enrollments/{}", seg(id)), Some(enrollment), &headers).await?.1)
    }

    pub async fn get_enrollment(&self, id: &str) -> Result<Value, ServiceError> {
        Ok(self.call(Method::GET, &format!("/enrollments/{}", seg(id)), None, &[]).await?.1)
    }

    pub async fn enrollment_attestation(&self, id: &str) -> Result<Value, ServiceError> {
        Ok(self.call(Method::POST, &format!("/enrollments/{}/attestationmechanism", seg(id)), None, &[]).await?.1)
    }

    pub async fn delete_enrollment(&self, id: &str, if_match: Option<&str>) -> Result<(), ServiceError> {
        let headers: Vec<_> = if_match.map(|e| ("If-Match", e.to_owned())).into_iter().collect();
        self.call(Method::DELETE, &format!("/enrollments/{}", seg(id)), None, &headers).await.map(|_| ())
    }

    /// Every individual enrollment, following continuation tokens.
    pub async fn list_enrollments(&self) -> Result<Vec<Value>, ServiceError> {
        self.collect("/enrollments/query".into(), serde_json::json!({"query": "SELECT * FROM enrollments"})).await
    }

    /// Azure's bulk operation (`mode`: create, update, updateIfMatchETag, delete; at most 10).
    pub async fn bulk_enrollments(&self, mode: &str, enrollments: Vec<Value>) -> Result<Value, ServiceError> {
        let body = serde_json::json!({"mode": mode, "enrollments": enrollments});
        Ok(self.call(Method::POST, "/enrollments", Some(&body), &[]).await?.1)
    }

    pub async fn get_registration(&self, id: &str) -> Result<Value, ServiceError> {
        Ok(self.call(Method::GET, &format!("/registrations/{}", seg(id)), None, &[]).await?.1)
    }

    pub async fn delete_registration(&self, id: &str) -> Result<(), ServiceError> {
        self.call(Method::DELETE, &format!("/registrations/{}", seg(id)), None, &[]).await.map(|_| ())
    }

    // Fleetgate's admin routes (Azure's control plane; the owner policy's `ServiceConfig`).

    /// The linked hubs with their allocation settings.
    pub async fn list_linked_hubs(&self) -> Result<Vec<Value>, ServiceError> {
        match self.call(Method::GET, "/linkedHubs", None, &[]).await?.1 {
            Value::Array(a) => Ok(a),
            other => Err(ServiceError::Transport(format!("linked hubs: not an array: {other}"))),
        }
    }

    /// Links hub `name`, or changes a linked hub's settings (`allocationWeight`,
    /// `applyAllocationPolicy`, `latencyMs`; absent ones are kept); `existing`: only change one
    /// already linked (`If-Match: *`). The answer carries the hub's `iothubowner` connection
    /// string.
    pub async fn put_linked_hub(&self, name: &str, settings: &Value, existing: bool) -> Result<Value, ServiceError> {
        let headers: Vec<_> = existing.then(|| ("If-Match", "*".to_owned())).into_iter().collect();
        Ok(self.call(Method::PUT, &format!("/linkedHubs/{}", seg(name)), Some(settings), &headers).await?.1)
    }

    /// Unlinks hub `name` (refused while it has device identities or is the only hub).
    pub async fn delete_linked_hub(&self, name: &str) -> Result<(), ServiceError> {
        self.call(Method::DELETE, &format!("/linkedHubs/{}", seg(name)), None, &[]).await.map(|_| ())
    }

    /// The policies, keys included, of the instance (`hub: None`) or of a linked hub.
    pub async fn list_policies(&self, hub: Option<&str>) -> Result<Vec<Value>, ServiceError> {
        let path = match hub {
            Some(h) => format!("/policies?hub={}", seg(h)),
            None => "/policies".to_owned(),
        };
        match self.call(Method::GET, &path, None, &[]).await?.1 {
            Value::Array(a) => Ok(a),
            other => Err(ServiceError::Transport(format!("policies: not an array: {other}"))),
        }
    }

    /// Replaces a policy's primary (or `secondary`) key; answers the policy with its keys.
    pub async fn renew_policy_key(
        &self,
        hub: Option<&str>,
        name: &str,
        secondary: bool,
    ) -> Result<Value, ServiceError> {
        let mut path =
            format!("/policies/{}/renewKey?key={}", seg(name), if secondary { "secondary" } else { "primary" });
        if let Some(h) = hub {
            path.push_str(&format!("&hub={}", seg(h)));
        }
        Ok(self.call(Method::POST, &path, None, &[]).await?.1)
    }

    /// Audit entries, oldest first: `since` an Azure timestamp, `id` a registration, device,
    /// group or policy id, `outcome` `success` or `failure`, `limit` the newest N (0: all).
    pub async fn audit(
        &self,
        since: Option<&str>,
        id: Option<&str>,
        outcome: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Value>, ServiceError> {
        let mut path = format!("/audit?limit={limit}");
        for (name, value) in [("since", since), ("id", id), ("outcome", outcome)] {
            if let Some(v) = value {
                path.push_str(&format!("&{name}={}", seg(v)));
            }
        }
        match self.call(Method::GET, &path, None, &[]).await?.1 {
            Value::Array(a) => Ok(a),
            other => Err(ServiceError::Transport(format!("audit: not an array: {other}"))),
        }
    }
}

/// True when an error is the service saying "not found".
pub fn is_not_found(e: &ServiceError) -> bool {
    e.status() == Some(StatusCode::NOT_FOUND.as_u16())
}
