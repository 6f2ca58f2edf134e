//! A client of the DPS service API (api-version 2021-10-01), authenticating like Azure's SDKs: a
//! fresh SAS token per request, signed with a shared access policy key.
//!
//! [`DpsServiceClient`] speaks typed items ([`EnrollmentGroup`], [`IndividualEnrollment`],
//! [`RegistrationState`]); [`RawDpsClient`] (from [`DpsServiceClient::raw`]) gives the same
//! operations on Azure's JSON as received, member order included, for tools that print it.

use percent_encoding::utf8_percent_encode;
use reqwest::Method;
use serde_json::{json, Value};

use crate::dps_types::{
    AttestationMechanism, BulkEnrollmentResult, BulkMode, EnrollmentGroup, IndividualEnrollment, RegistrationState,
};
use crate::rest::{decode, RestClient};
use crate::{ConnectionString, Error};

/// The DPS service API version this client speaks.
pub const API_VERSION: &str = "2021-10-01";

/// The former name of [`Error`], kept for existing code.
pub type ServiceError = Error;

/// The DPS service API: enrollment groups, individual enrollments, registration records.
///
/// ```no_run
/// # async fn demo() -> Result<(), fleetgate_client::Error> {
/// use fleetgate_client::{ConnectionString, DpsServiceClient, EnrollmentGroup};
///
/// let conn: ConnectionString = std::env::var("FLEETGATE_CONNECTION_STRING").unwrap().parse().unwrap();
/// let ca = std::fs::read("fleetgate-data/ca.pem").unwrap();
/// let dps = DpsServiceClient::new(conn, Some(&ca))?;
/// let group = dps.put_enrollment_group(&EnrollmentGroup::symmetric_key("sensors"), None).await?;
/// println!("created {} (etag {:?})", group.enrollment_group_id, group.etag);
/// for record in dps.list_registrations("sensors").await? {
///     println!("{} -> {:?}", record.registration_id, record.assigned_hub);
/// }
/// # Ok(()) }
/// ```
pub struct DpsServiceClient {
    raw: RawDpsClient,
}

/// The DPS service API on untyped JSON: what Azure sent, unchanged (for printing, or members
/// this crate does not model).
pub struct RawDpsClient {
    rest: RestClient,
}

/// One page of a query and the token for the next.
pub struct Page {
    /// The items of this page.
    pub items: Vec<Value>,
    /// The token for the next page; `None` on the last.
    pub continuation: Option<String>,
}

fn seg(s: &str) -> String {
    utf8_percent_encode(s, fleetgate_core::sas::URI_COMPONENT).to_string()
}

fn if_match(etag: Option<&str>) -> Vec<(&'static str, String)> {
    etag.map(|e| ("If-Match", e.to_owned())).into_iter().collect()
}

fn to_json(what: &str, v: &impl serde::Serialize) -> Result<Value, Error> {
    serde_json::to_value(v).map_err(|e| Error::Config(format!("{what} cannot be written as JSON: {e}")))
}

impl DpsServiceClient {
    /// A client for the service named in `conn`. `ca_pem`: the CA that signed the server's
    /// certificate (Fleetgate's `ca.pem`). The system's roots are not loaded: with `None`, no
    /// server is trusted.
    pub fn new(conn: ConnectionString, ca_pem: Option<&[u8]>) -> Result<Self, Error> {
        Ok(Self { raw: RawDpsClient::new(conn, ca_pem)? })
    }

    /// The same operations on Azure's JSON as received.
    pub fn raw(&self) -> &RawDpsClient {
        &self.raw
    }

    /// Whether the server answers its liveness probe, `GET /healthz`.
    pub async fn healthz(&self) -> Result<(), Error> {
        self.raw.healthz().await
    }

    /// Creates a group, or replaces it (`if_match`: only if its etag still matches; `*` for
    /// unconditional). Returns the group as stored (keys left out).
    pub async fn put_enrollment_group(
        &self,
        group: &EnrollmentGroup,
        if_match: Option<&str>,
    ) -> Result<EnrollmentGroup, Error> {
        let v = self.raw.put_enrollment_group(&to_json("the enrollment group", group)?, if_match).await?;
        decode("enrollment group", v)
    }

    /// A group by id ([`Error::NotFound`] when there is none); its keys are left out.
    pub async fn get_enrollment_group(&self, id: &str) -> Result<EnrollmentGroup, Error> {
        decode("enrollment group", self.raw.get_enrollment_group(id).await?)
    }

    /// A group's attestation with its keys.
    pub async fn enrollment_group_attestation(&self, id: &str) -> Result<AttestationMechanism, Error> {
        decode("attestation mechanism", self.raw.enrollment_group_attestation(id).await?)
    }

    /// Deletes a group (`if_match`: only if its etag still matches). Its registration records
    /// stay, as in Azure.
    pub async fn delete_enrollment_group(&self, id: &str, if_match: Option<&str>) -> Result<(), Error> {
        self.raw.delete_enrollment_group(id, if_match).await
    }

    /// Every enrollment group, following continuation tokens.
    pub async fn list_enrollment_groups(&self) -> Result<Vec<EnrollmentGroup>, Error> {
        decode("enrollment groups", Value::Array(self.raw.list_enrollment_groups().await?))
    }

    /// Every registration record of a group, following continuation tokens.
    pub async fn list_registrations(&self, group_id: &str) -> Result<Vec<RegistrationState>, Error> {
        decode("registration records", Value::Array(self.raw.list_registrations(group_id).await?))
    }

    /// Creates an individual enrollment, or replaces it (`if_match` as for groups).
    pub async fn put_enrollment(
        &self,
        enrollment: &IndividualEnrollment,
        if_match: Option<&str>,
    ) -> Result<IndividualEnrollment, Error> {
        let v = self.raw.put_enrollment(&to_json("the enrollment", enrollment)?, if_match).await?;
        decode("individual enrollment", v)
    }

    /// An individual enrollment by registration id; its keys are left out.
    pub async fn get_enrollment(&self, id: &str) -> Result<IndividualEnrollment, Error> {
        decode("individual enrollment", self.raw.get_enrollment(id).await?)
    }

    /// An individual enrollment's attestation with its keys.
    pub async fn enrollment_attestation(&self, id: &str) -> Result<AttestationMechanism, Error> {
        decode("attestation mechanism", self.raw.enrollment_attestation(id).await?)
    }

    /// Deletes an individual enrollment: its device can no longer register.
    pub async fn delete_enrollment(&self, id: &str, if_match: Option<&str>) -> Result<(), Error> {
        self.raw.delete_enrollment(id, if_match).await
    }

    /// Every individual enrollment, following continuation tokens.
    pub async fn list_enrollments(&self) -> Result<Vec<IndividualEnrollment>, Error> {
        decode("individual enrollments", Value::Array(self.raw.list_enrollments().await?))
    }

    /// Azure's bulk operation on up to 10 individual enrollments.
    pub async fn bulk_enrollments(
        &self,
        mode: BulkMode,
        enrollments: &[IndividualEnrollment],
    ) -> Result<BulkEnrollmentResult, Error> {
        let items = enrollments.iter().map(|e| to_json("the enrollment", e)).collect::<Result<_, _>>()?;
        decode("bulk result", self.raw.bulk_enrollments(mode.as_str(), items).await?)
    }

    /// A device's registration record ([`Error::NotFound`] before it registered).
    pub async fn get_registration(&self, id: &str) -> Result<RegistrationState, Error> {
        decode("registration record", self.raw.get_registration(id).await?)
    }

    /// Deletes a registration record (the device may then register afresh).
    pub async fn delete_registration(&self, id: &str) -> Result<(), Error> {
        self.raw.delete_registration(id).await
    }
}

impl RawDpsClient {
    /// A client for the service named in `conn`, trusting `ca_pem` (as [`DpsServiceClient::new`]).
    pub fn new(conn: ConnectionString, ca_pem: Option<&[u8]>) -> Result<Self, Error> {
        Ok(Self { rest: RestClient::new(conn, ca_pem, API_VERSION)? })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(reqwest::header::HeaderMap, Value), Error> {
        self.rest.call(method, path, body, headers).await
    }

    /// Whether the server answers its liveness probe, `GET /healthz`.
    pub async fn healthz(&self) -> Result<(), Error> {
        self.call(Method::GET, "/healthz", None, &[]).await.map(|_| ())
    }

    /// [`DpsServiceClient::put_enrollment_group`] on JSON (the id is `enrollmentGroupId`).
    pub async fn put_enrollment_group(&self, group: &Value, if_match: Option<&str>) -> Result<Value, Error> {
        let id = group.get("enrollmentGroupId").and_then(Value::as_str).unwrap_or_default();
        Ok(self
            .call(Method::PUT, &format!("/enrollmentGroups/{}", seg(id)), Some(group), &self::if_match(if_match))
            .await?
            .1)
    }

    /// [`DpsServiceClient::get_enrollment_group`] on JSON.
    pub async fn get_enrollment_group(&self, id: &str) -> Result<Value, Error> {
        Ok(self.call(Method::GET, &format!("/enrollmentGroups/{}", seg(id)), None, &[]).await?.1)
    }

    /// [`DpsServiceClient::enrollment_group_attestation`] on JSON.
    pub async fn enrollment_group_attestation(&self, id: &str) -> Result<Value, Error> {
        Ok(self.call(Method::POST, &format!("/enrollmentGroups/{}/attestationmechanism", seg(id)), None, &[]).await?.1)
    }

    /// [`DpsServiceClient::delete_enrollment_group`].
    pub async fn delete_enrollment_group(&self, id: &str, if_match: Option<&str>) -> Result<(), Error> {
        self.call(Method::DELETE, &format!("/enrollmentGroups/{}", seg(id)), None, &self::if_match(if_match))
            .await
            .map(|_| ())
    }

    /// One page of a query (`x-ms-max-item-count`: `page_size`; `continuation` from the last page).
    pub async fn query(
        &self,
        path: &str,
        body: Value,
        page_size: Option<usize>,
        continuation: Option<&str>,
    ) -> Result<Page, Error> {
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
            other => return Err(Error::Protocol(format!("query returned a non-array: {other}"))),
        };
        let continuation = h.get("x-ms-continuation").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Page { items, continuation })
    }

    /// [`DpsServiceClient::list_enrollment_groups`] on JSON.
    pub async fn list_enrollment_groups(&self) -> Result<Vec<Value>, Error> {
        self.collect("/enrollmentGroups/query".into(), json!({"query": "SELECT * FROM enrollmentGroups"})).await
    }

    /// [`DpsServiceClient::list_registrations`] on JSON.
    pub async fn list_registrations(&self, group_id: &str) -> Result<Vec<Value>, Error> {
        self.collect(format!("/registrations/{}/query", seg(group_id)), json!({"query": "SELECT * FROM registrations"}))
            .await
    }

    async fn collect(&self, path: String, body: Value) -> Result<Vec<Value>, Error> {
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

    /// [`DpsServiceClient::put_enrollment`] on JSON (the id is `registrationId`).
    pub async fn put_enrollment(&self, enrollment: &Value, if_match: Option<&str>) -> Result<Value, Error> {
        let id = enrollment.get("registrationId").and_then(Value::as_str).unwrap_or_default();
        Ok(self
            .call(Method::PUT, &format!("/enrollments/{}", seg(id)), Some(enrollment), &self::if_match(if_match))
            .await?
            .1)
    }

    /// [`DpsServiceClient::get_enrollment`] on JSON.
    pub async fn get_enrollment(&self, id: &str) -> Result<Value, Error> {
        Ok(self.call(Method::GET, &format!("/enrollments/{}", seg(id)), None, &[]).await?.1)
    }

    /// [`DpsServiceClient::enrollment_attestation`] on JSON.
    pub async fn enrollment_attestation(&self, id: &str) -> Result<Value, Error> {
        Ok(self.call(Method::POST, &format!("/enrollments/{}/attestationmechanism", seg(id)), None, &[]).await?.1)
    }

    /// [`DpsServiceClient::delete_enrollment`].
    pub async fn delete_enrollment(&self, id: &str, if_match: Option<&str>) -> Result<(), Error> {
        self.call(Method::DELETE, &format!("/enrollments/{}", seg(id)), None, &self::if_match(if_match))
            .await
            .map(|_| ())
    }

    /// [`DpsServiceClient::list_enrollments`] on JSON.
    pub async fn list_enrollments(&self) -> Result<Vec<Value>, Error> {
        self.collect("/enrollments/query".into(), json!({"query": "SELECT * FROM enrollments"})).await
    }

    /// Azure's bulk operation (`mode`: create, update, updateIfMatchETag, delete; at most 10).
    pub async fn bulk_enrollments(&self, mode: &str, enrollments: Vec<Value>) -> Result<Value, Error> {
        let body = json!({"mode": mode, "enrollments": enrollments});
        Ok(self.call(Method::POST, "/enrollments", Some(&body), &[]).await?.1)
    }

    /// [`DpsServiceClient::get_registration`] on JSON.
    pub async fn get_registration(&self, id: &str) -> Result<Value, Error> {
        Ok(self.call(Method::GET, &format!("/registrations/{}", seg(id)), None, &[]).await?.1)
    }

    /// [`DpsServiceClient::delete_registration`].
    pub async fn delete_registration(&self, id: &str) -> Result<(), Error> {
        self.call(Method::DELETE, &format!("/registrations/{}", seg(id)), None, &[]).await.map(|_| ())
    }

    // Fleetgate's admin routes (Azure's control plane; the owner policy's `ServiceConfig`).

    /// The linked hubs with their allocation settings.
    pub async fn list_linked_hubs(&self) -> Result<Vec<Value>, Error> {
        match self.call(Method::GET, "/linkedHubs", None, &[]).await?.1 {
            Value::Array(a) => Ok(a),
            other => Err(Error::Protocol(format!("linked hubs: not an array: {other}"))),
        }
    }

    /// Links hub `name`, or changes a linked hub's settings (`allocationWeight`,
    /// `applyAllocationPolicy`, `latencyMs`; absent ones are kept); `existing`: only change one
    /// already linked (`If-Match: *`). The answer carries the hub's `iothubowner` connection
    /// string.
    pub async fn put_linked_hub(&self, name: &str, settings: &Value, existing: bool) -> Result<Value, Error> {
        let headers: Vec<_> = existing.then(|| ("If-Match", "*".to_owned())).into_iter().collect();
        Ok(self.call(Method::PUT, &format!("/linkedHubs/{}", seg(name)), Some(settings), &headers).await?.1)
    }

    /// Unlinks hub `name` (refused while it has device identities or is the only hub).
    pub async fn delete_linked_hub(&self, name: &str) -> Result<(), Error> {
        self.call(Method::DELETE, &format!("/linkedHubs/{}", seg(name)), None, &[]).await.map(|_| ())
    }

    /// The policies, keys included, of the instance (`hub: None`) or of a linked hub.
    pub async fn list_policies(&self, hub: Option<&str>) -> Result<Vec<Value>, Error> {
        let path = match hub {
            Some(h) => format!("/policies?hub={}", seg(h)),
            None => "/policies".to_owned(),
        };
        match self.call(Method::GET, &path, None, &[]).await?.1 {
            Value::Array(a) => Ok(a),
            other => Err(Error::Protocol(format!("policies: not an array: {other}"))),
        }
    }

    /// Replaces a policy's primary (or `secondary`) key; answers the policy with its keys.
    pub async fn renew_policy_key(&self, hub: Option<&str>, name: &str, secondary: bool) -> Result<Value, Error> {
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
    ) -> Result<Vec<Value>, Error> {
        let mut path = format!("/audit?limit={limit}");
        for (name, value) in [("since", since), ("id", id), ("outcome", outcome)] {
            if let Some(v) = value {
                path.push_str(&format!("&{name}={}", seg(v)));
            }
        }
        match self.call(Method::GET, &path, None, &[]).await?.1 {
            Value::Array(a) => Ok(a),
            other => Err(Error::Protocol(format!("audit: not an array: {other}"))),
        }
    }
}

/// True when an error is the service saying "not found" (same as [`Error::is_not_found`]).
pub fn is_not_found(e: &Error) -> bool {
    e.is_not_found()
}
