//! [`Hub`]: every hub decision, independent of the wire.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use fleetgate_core::device::{AuthenticationType, DeviceCredentials, DeviceIdentity, DeviceStatus};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::message::{check_bag, C2dMessage, Properties, ReceivedEvent};
use fleetgate_core::sas::SasToken;
use fleetgate_core::throttle::{Rate, TokenBucket};
use fleetgate_core::time::Timestamp;
use fleetgate_core::twin::{parse_patch, Twin};
use fleetgate_core::x509::{Certificate, CertificateChain};
use fleetgate_core::{DpsError, ErrorCode};
use fleetgate_store::{EventPage, LinkedHub, Store, StoreError};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::mqtt::Subscription;
use crate::sessions::{CloseCount, DesiredPatch, MethodCall, Outbound, SessionHandle, Sessions};
use crate::telemetry::EventWriter;

/// Azure's limits and defaults that a deployment may tune.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Largest device-to-cloud message (body plus properties): 256 KB in Azure.
    pub max_message_bytes: usize,
    /// Largest cloud-to-device message: 64 KB.
    pub max_c2d_bytes: usize,
    /// Pending cloud-to-device messages per device: 50.
    pub c2d_queue_depth: usize,
    /// Default and maximum cloud-to-device time to live: 1 hour and 2 days.
    pub c2d_default_ttl: Duration,
    pub c2d_max_ttl: Duration,
    /// Largest direct method payload: 128 KB.
    pub max_method_payload_bytes: usize,
    /// Device connects admitted per hub; over it, CONNACK 3 (server unavailable: the SDKs retry).
    pub connect_rate: Option<Rate>,
    /// Device-to-cloud messages per hub; over it, acknowledgements are delayed (traffic shaping,
    /// as IoT Hub does) rather than refused.
    pub message_rate: Option<Rate>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_c2d_bytes: 64 * 1024,
            c2d_queue_depth: 50,
            c2d_default_ttl: Duration::from_secs(3600),
            c2d_max_ttl: Duration::from_secs(2 * 24 * 3600),
            max_method_payload_bytes: 128 * 1024,
            connect_rate: None,
            message_rate: None,
        }
    }
}

/// A device that authenticated to a hub.
#[derive(Debug, Clone)]
pub struct HubDevice {
    pub hub: String,
    pub device_id: String,
    /// When the device was last active (ticks), shared with [`Hub::device_json`].
    last_activity: Arc<AtomicI64>,
    /// When the credentials the device connected with stop being accepted: its SAS token's
    /// expiry (plus the clock skew a CONNECT is allowed), its certificate's notAfter. The
    /// connection must not outlive them (Azure closes it; the SDKs reconnect with new ones).
    expires: Option<Timestamp>,
    /// The device's close requests before its identity was read: its session is refused if one
    /// came since (see [`Sessions::register`]).
    closes: CloseCount,
}

impl HubDevice {
    /// See the `expires` field; `None` only for devices made without credentials (tests).
    pub fn credentials_expire(&self) -> Option<Timestamp> {
        self.expires
    }

    /// Records activity: an atomic store, since it happens on every message.
    fn touch(&self, now: Timestamp) {
        self.last_activity.store(now.ticks(), Ordering::Relaxed);
    }
}

/// Why a hub CONNECT was refused (all map to CONNACK "not authorized").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectRefusal {
    UnknownHub,
    UnknownDevice,
    BadCredentials,
    Disabled,
}

/// What checking a device's CONNECT found: three ways, because the check can fail for two
/// reasons, and a store outage must not read as a wrong key (the SDKs give up on "not
/// authorized" for good, and retry "server unavailable").
#[derive(Debug, Clone)]
pub enum Authentication {
    Identified(HubDevice),
    Refused(ConnectRefusal),
    /// The store could not be read: nothing is known about the device; it should retry.
    CouldNotCheck,
}

type MethodWaiter = oneshot::Sender<(i32, Value)>;

/// A direct method call awaiting its answer, named by everything the answer must match: the
/// hub, the device, the connection the request went out on and its unguessable request id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PendingMethod {
    hub: String,
    device: String,
    session: u64,
    rid: String,
}

impl PendingMethod {
    fn new(hub: &str, device: &str, session: u64, rid: &str) -> Self {
        Self { hub: hub.to_ascii_lowercase(), device: device.to_ascii_lowercase(), session, rid: rid.to_owned() }
    }
}

/// A request id for a direct method: 128 random bits from the OS generator (UUID v4) in hex,
/// so no device can answer a call it was not sent. The SDKs echo rids as opaque strings.
fn new_method_rid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub struct Hub {
    store: Arc<dyn Store>,
    config: HubConfig,
    pub(crate) sessions: Sessions,
    events: EventWriter,
    methods: Mutex<HashMap<PendingMethod, MethodWaiter>>,
    /// Last activity per device (ticks; 0 = none), kept in memory (Azure reports it eventually
    /// consistent too). Each connection holds its device's entry.
    activity: Mutex<HashMap<(String, String), Arc<AtomicI64>>>,
    /// Per-hub connect and message quotas, keyed by (hub, "connect" | "message").
    throttles: Mutex<HashMap<(String, &'static str), TokenBucket>>,
    started: std::time::Instant,
    /// Device connections and service-side changes.
    pub(crate) audit: fleetgate_store::AuditLog,
}

pub(crate) fn store_err(e: StoreError) -> DpsError {
    match e {
        StoreError::Rejected(d) => d,
        // The store could not answer: "retry later" (503, as the provisioning service answers
        // it), never an answer that reads as the caller's fault or as permanent.
        StoreError::Backend(msg) => {
            fleetgate_metrics::log_limited!(tracing::Level::ERROR, error = %msg, "store failure");
            DpsError::unavailable()
        }
        StoreError::Unavailable(msg) => {
            tracing::warn!(error = %msg, "store refused a change (retryable)");
            DpsError::unavailable()
        }
    }
}

fn not_found(device_id: &str) -> DpsError {
    DpsError::new(
        ErrorCode::DeviceNotFound,
        format!("Device '{}' was not found.", device_id.chars().take(140).collect::<String>()),
    )
}

/// The twin's etag changes with every version.
pub fn twin_etag(twin: &Twin) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\"{}\"", twin.version))
}

impl Hub {
    pub fn new(store: Arc<dyn Store>, config: HubConfig) -> Self {
        let audit = fleetgate_store::AuditLog::start(store.clone());
        Self::with_audit(store, config, audit)
    }

    /// [`Hub::new`] recording into `audit`, which the server shares with the provisioning
    /// service so that refusals are counted per source whichever service refused them.
    pub fn with_audit(store: Arc<dyn Store>, config: HubConfig, audit: fleetgate_store::AuditLog) -> Self {
        let events = EventWriter::start(store.clone());
        Self {
            store,
            config,
            sessions: Sessions::default(),
            events,
            methods: Mutex::new(HashMap::new()),
            activity: Mutex::new(HashMap::new()),
            throttles: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            audit,
        }
    }

    fn take(&self, hub: &str, kind: &'static str, rate: Rate) -> Result<(), Duration> {
        let now = self.started.elapsed().as_secs_f64();
        let mut map = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((hub.to_ascii_lowercase(), kind)).or_insert_with(|| TokenBucket::new(rate, now)).try_take(now)
    }

    /// Admits one device connect under the hub's quota.
    pub fn admit_connect(&self, hub: &str) -> bool {
        match self.config.connect_rate {
            None => true,
            Some(rate) => {
                let ok = self.take(hub, "connect", rate).is_ok();
                if !ok {
                    // Debug: counted in the throttled metric; a line per refused connect would be a flood.
                    tracing::debug!(hub = %hub, "device connect throttled");
                    fleetgate_metrics::METRICS.throttle("connect");
                }
                ok
            }
        }
    }

    /// Waits until the hub's message quota admits one more message.
    async fn admit_message(&self, hub: &str) {
        let Some(rate) = self.config.message_rate else { return };
        let mut counted = false;
        while let Err(wait) = self.take(hub, "message", rate) {
            if !std::mem::replace(&mut counted, true) {
                fleetgate_metrics::METRICS.throttle("message");
            }
            tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Whether telemetry can be taken: `false` while the event log's last append failed.
    pub fn telemetry_healthy(&self) -> bool {
        self.events.healthy()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn audit(&self) -> &fleetgate_store::AuditLog {
        &self.audit
    }

    pub async fn hub_named(&self, host: &str) -> Result<Option<LinkedHub>, DpsError> {
        let hubs = self.store.hubs().await.map_err(store_err)?;
        Ok(hubs.into_iter().find(|h| h.host_name.eq_ignore_ascii_case(host)))
    }

    /// Checks a device's CONNECT: its SAS token for `{hub}/devices/{id}` signed with one of the
    /// device's keys, or, for an X.509 identity, the client certificate chain of its TLS
    /// connection (see [`DeviceIdentity::check_certificate`]). Reasons are recorded, never sent;
    /// refusals are counted per `source` address (see [`fleetgate_store::AuditLog::refused`]).
    pub async fn authenticate(
        &self,
        host: &str,
        device_id: &str,
        password: Option<&str>,
        certificates: Option<&CertificateChain>,
        source: Option<std::net::IpAddr>,
    ) -> Authentication {
        let refuse_because = |r: ConnectRefusal, why: &str| {
            use fleetgate_core::audit::{AuditCategory, AuditEntry, Outcome};
            tracing::debug!(hub = %host, device = %device_id.chars().take(140).collect::<String>(), reason = ?r, "hub connection refused");
            let reason = if why.is_empty() { format!("{r:?}") } else { format!("{r:?}: {why}") };
            self.audit.refused(
                source,
                AuditEntry::new(AuditCategory::DeviceOperations, "connect", device_id, Outcome::Failure)
                    .target(host)
                    .reason(reason),
            );
            Authentication::Refused(r)
        };
        let refuse = |r: ConnectRefusal| refuse_because(r, "");
        let could_not_check = |e: &dyn std::fmt::Display| {
            fleetgate_metrics::log_limited!(tracing::Level::WARN, hub = %host, error = %e, "device connection could not be checked (store failure)");
            Authentication::CouldNotCheck
        };
        // Before anything is read: a change committed after the reads below is then seen by
        // `connect_session`, which refuses the session.
        let closes = self.sessions.closes_before_auth(host, device_id);
        let hub = match self.hub_named(host).await {
            Ok(Some(h)) => h,
            Ok(None) => return refuse(ConnectRefusal::UnknownHub),
            Err(e) => return could_not_check(&e),
        };
        let device = match self.store.device(&hub.host_name, device_id).await {
            Ok(Some(d)) => d,
            Ok(None) => return refuse(ConnectRefusal::UnknownDevice),
            Err(e) => return could_not_check(&e),
        };
        if device.authentication_type != AuthenticationType::Sas {
            let fallback = if device.ca_certificates.is_empty() {
                match self.group_cas().await {
                    Ok(cas) => cas,
                    Err(e) => return could_not_check(&e),
                }
            } else {
                Vec::new()
            };
            if let Err(why) = device.check_certificate(certificates, &fallback, Timestamp::now().unix_seconds()) {
                return refuse_because(ConnectRefusal::BadCredentials, &format!("X.509: {why}"));
            }
            if device.status == DeviceStatus::Disabled {
                return refuse(ConnectRefusal::Disabled);
            }
            // The leaf was parsed and checked above; its notAfter is the session's end.
            let not_after = certificates
                .and_then(|c| Certificate::from_der(c.leaf()).ok())
                .map(|leaf| Timestamp::from_unix_seconds(leaf.validity().1.saturating_add(1)));
            return Authentication::Identified(self.connected_device(
                hub.host_name,
                device.device_id,
                not_after,
                closes,
            ));
        }
        let Some(token) = password.and_then(|p| SasToken::parse(p).ok()) else {
            return refuse(ConnectRefusal::BadCredentials);
        };
        let expected = format!("{}/devices/{}", hub.host_name, device_id);
        let resource_ok = token.resource.trim_end_matches('/').eq_ignore_ascii_case(&expected);
        let fresh = token.check_expiry(Timestamp::now().unix_seconds()).is_ok();
        let signed = [&device.primary_key, &device.secondary_key]
            .iter()
            .filter_map(|k| SymmetricKey::from_base64(k).ok())
            .filter(|k| !k.as_bytes().is_empty())
            .any(|k| token.signed_with(&k));
        if !(resource_ok && fresh && signed) {
            return refuse(ConnectRefusal::BadCredentials);
        }
        if device.status == DeviceStatus::Disabled {
            return refuse(ConnectRefusal::Disabled);
        }
        // The first second `check_expiry` refuses the token is when the connection ends: a
        // token accepted at CONNECT (skew included) keeps it open exactly as long as it would
        // still be accepted.
        let expires = token.accepted_until().saturating_add(1);
        let expires = Some(Timestamp::from_unix_seconds(expires));
        Authentication::Identified(self.connected_device(hub.host_name, device.device_id, expires, closes))
    }

    fn connected_device(
        &self,
        hub: String,
        device_id: String,
        expires: Option<Timestamp>,
        closes: CloseCount,
    ) -> HubDevice {
        let last_activity = self
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((hub.to_ascii_lowercase(), device_id.to_ascii_lowercase()))
            .or_default()
            .clone();
        HubDevice { hub, device_id, last_activity, expires, closes }
    }

    /// The CA certificates a `certificateAuthority` identity created through the service API
    /// (with no CA certificates of its own) is checked against: those of the instance's X.509
    /// enrollment groups, the CAs this deployment has verified.
    async fn group_cas(&self) -> Result<Vec<Certificate>, StoreError> {
        let groups = self.store.groups().await?;
        Ok(groups
            .iter()
            .filter_map(|g| match g.settings.x509_trust() {
                Some(fleetgate_core::enrollment::X509Trust::CertificateAuthority(cas)) => Some(cas),
                _ => None,
            })
            .flatten()
            .flatten()
            .collect())
    }

    /// Marks the device connected; the returned handle receives what the service sends it.
    /// `None` when the device was disabled, deleted or given other credentials after
    /// [`Hub::authenticate`] read its identity (or, rarely, another device sharing its close
    /// counter was): the connection must be refused, with an answer the device retries, since
    /// its credentials may still be good.
    pub fn connect_session(&self, d: &HubDevice) -> Option<SessionHandle> {
        let now = Timestamp::now().to_azure_string();
        let Some(handle) = self.sessions.register(&d.hub, &d.device_id, d.closes, now) else {
            tracing::info!(hub = %d.hub, device = %d.device_id, "device identity changed while it connected; refusing the connection");
            return None;
        };
        d.touch(Timestamp::now());
        fleetgate_metrics::METRICS.hub_sessions.set(self.sessions.count() as i64);
        Some(handle)
    }

    pub fn disconnect_session(&self, d: &HubDevice, id: u64) {
        self.sessions.unregister(&d.hub, &d.device_id, id, Timestamp::now().to_azure_string());
        fleetgate_metrics::METRICS.hub_sessions.set(self.sessions.count() as i64);
        // Calls sent on this connection can no longer be answered (an answer counts only on
        // the connection the call went out on): their callers learn it now, not at timeout.
        self.methods.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.session != id);
    }

    /// The subscriptions a CleanSession-0 device left behind (stream, granted QoS 0 or 1).
    /// Devices rely on them: the SDKs do not subscribe again after reconnecting.
    pub async fn load_subscriptions(&self, d: &HubDevice) -> Result<Option<Vec<(Subscription, u8)>>, DpsError> {
        let Some(state) = self.store.mqtt_session(&d.hub, &d.device_id).await.map_err(store_err)? else {
            return Ok(None);
        };
        let map: serde_json::Map<String, Value> = serde_json::from_str(&state).unwrap_or_default();
        Ok(Some(
            map.iter()
                .filter_map(|(k, v)| Some((Subscription::from_name(k)?, v.as_u64().unwrap_or(1).min(1) as u8)))
                .collect(),
        ))
    }

    /// Persists (Some) or forgets (None) a device's subscriptions.
    pub async fn save_subscriptions(&self, d: &HubDevice, subs: Option<&[(Subscription, u8)]>) -> Result<(), DpsError> {
        let state =
            subs.map(|s| Value::Object(s.iter().map(|(k, q)| (k.name().to_owned(), json!(q))).collect()).to_string());
        self.store.set_mqtt_session(&d.hub, &d.device_id, state.as_deref()).await.map_err(store_err)
    }

    /// Validates and durably appends one telemetry message; resolves once it is on disk.
    pub async fn ingest(&self, d: &HubDevice, bag: &str, body: bytes::Bytes) -> Result<u64, DpsError> {
        if body.len() + bag.len() > self.config.max_message_bytes {
            return Err(DpsError::new(ErrorCode::MessageTooLarge, "The message is larger than 256 KB."));
        }
        check_bag(bag).map_err(|e| DpsError::bad_request(e.to_string()))?;
        self.admit_message(&d.hub).await;
        let now = Timestamp::now();
        d.touch(now);
        let event = ReceivedEvent {
            hub: d.hub.clone(),
            device_id: d.device_id.clone(),
            enqueued_time: now,
            bag: bag.to_owned(),
            body: body.to_vec(),
        };
        let seq = self.events.append(event).await?;
        fleetgate_metrics::METRICS.messages.inc();
        Ok(seq)
    }

    pub fn event_notifications(&self) -> tokio::sync::broadcast::Receiver<u64> {
        self.events.subscribe()
    }

    /// A hub's events from position `from`; the page says where to continue.
    pub async fn events(&self, hub: &str, from: u64, limit: usize) -> Result<EventPage, DpsError> {
        self.store.events(hub, from, limit).await.map_err(store_err)
    }

    /// Position of the newest event in the stream (any hub; 0 when there is none).
    pub async fn last_event_seq(&self) -> Result<u64, DpsError> {
        self.store.last_event_seq().await.map_err(store_err)
    }

    pub async fn twin(&self, hub: &str, device_id: &str) -> Result<(DeviceIdentity, Twin), DpsError> {
        self.store.twin(hub, device_id).await.map_err(store_err)?.ok_or_else(|| not_found(device_id))
    }

    /// A device's reported-properties patch; returns the new reported version.
    pub async fn patch_reported(&self, d: &HubDevice, body: &[u8]) -> Result<u64, DpsError> {
        let patch = parse_patch(body)?;
        let id = d.device_id.clone();
        let updated = self
            .store
            .update_device(
                &d.hub,
                &d.device_id,
                Box::new(move |cur| {
                    let (dev, mut twin) = cur.ok_or_else(|| not_found(&id))?;
                    twin.patch_reported(&patch)?;
                    Ok(Some((dev, twin)))
                }),
            )
            .await
            .map_err(store_err)?;
        d.touch(Timestamp::now());
        Ok(updated.map(|(_, t)| t.reported_version).unwrap_or_default())
    }

    /// A service's twin patch (`tags` and/or `properties.desired`), etag-checked; the device is
    /// told about desired changes if it listens.
    pub async fn patch_twin(
        &self,
        hub: &str,
        device_id: &str,
        body: &[u8],
        if_match: Option<String>,
    ) -> Result<(DeviceIdentity, Twin), DpsError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| DpsError::bad_request(format!("Malformed twin JSON: {e}")))?;
        let tags = match v.get("tags") {
            None | Some(Value::Null) => None,
            Some(t) => Some(parse_patch(t.to_string().as_bytes())?),
        };
        let desired = match v.pointer("/properties/desired") {
            None | Some(Value::Null) => None,
            Some(p) => Some(parse_patch(p.to_string().as_bytes())?),
        };
        if v.pointer("/properties/reported").is_some() {
            return Err(DpsError::bad_request("Reported properties are written by the device only."));
        }
        let id = device_id.to_owned();
        let desired_for_store = desired.clone();
        let (dev, twin) = self
            .store
            .update_device(
                hub,
                device_id,
                Box::new(move |cur| {
                    let (dev, mut twin) = cur.ok_or_else(|| not_found(&id))?;
                    if let Some(m) = if_match.as_deref().map(str::trim).filter(|m| !m.is_empty() && *m != "*") {
                        if m.trim_matches('"') != twin_etag(&twin).trim_matches('"') {
                            return Err(DpsError::new(
                                ErrorCode::PreconditionFailed,
                                "The twin etag does not match (precondition failed).",
                            ));
                        }
                    }
                    if let Some(t) = &tags {
                        twin.patch_tags(t)?;
                    }
                    if let Some(d) = &desired_for_store {
                        twin.patch_desired(d)?;
                    }
                    Ok(Some((dev, twin)))
                }),
            )
            .await
            .map_err(store_err)?
            .ok_or_else(|| not_found(device_id))?;
        if let Some(patch) = desired {
            if let Some(live) = self.sessions.get(hub, device_id) {
                if live.flags.desired.load(Ordering::Relaxed) {
                    let body = Twin::desired_notification(&patch, twin.desired_version);
                    // A device too slow to take it re-reads the twin on reconnect (the SDKs do).
                    let _ = live.tx.try_send(Outbound::DesiredPatch(Box::new(DesiredPatch {
                        body,
                        version: twin.desired_version,
                    })));
                }
            }
        }
        Ok((dev, twin))
    }

    /// Invokes a direct method and waits for the device's answer (status, payload).
    pub async fn invoke_method(
        &self,
        hub: &str,
        device_id: &str,
        name: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<(i32, Value), DpsError> {
        if name.is_empty() || name.len() > 256 {
            return Err(DpsError::bad_request("methodName must be 1 to 256 characters."));
        }
        if payload.to_string().len() > self.config.max_method_payload_bytes {
            return Err(DpsError::new(ErrorCode::MessageTooLarge, "The method payload is larger than 128 KB."));
        }
        self.twin(hub, device_id).await?;
        let offline = || {
            DpsError::new(ErrorCode::DeviceNotOnline, "The device is not online or not listening for direct methods.")
        };
        let live = self.sessions.get(hub, device_id).ok_or_else(offline)?;
        if !live.flags.methods.load(Ordering::Relaxed) {
            return Err(offline());
        }
        let rid = new_method_rid();
        let pending = PendingMethod::new(hub, device_id, live.id, &rid);
        let (wtx, wrx) = oneshot::channel();
        self.methods.lock().unwrap_or_else(|p| p.into_inner()).insert(pending.clone(), wtx);
        if live.tx.try_send(Outbound::Method(Box::new(MethodCall { rid, name: name.to_owned(), payload }))).is_err() {
            self.methods.lock().unwrap_or_else(|p| p.into_inner()).remove(&pending);
            return Err(offline());
        }
        match tokio::time::timeout(timeout, wrx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                self.methods.lock().unwrap_or_else(|p| p.into_inner()).remove(&pending);
                Err(DpsError::new(ErrorCode::GatewayTimeout, "The device did not answer the direct method in time."))
            }
        }
    }

    /// A device's answer to a method call, from its connection `session`. It counts only if that
    /// connection was sent a call with this rid and it is still waiting: an answer from another
    /// device, hub or connection, or a late one, is ignored.
    pub fn method_response(&self, d: &HubDevice, session: u64, rid: &str, status: i32, body: &[u8]) {
        let key = PendingMethod::new(&d.hub, &d.device_id, session, rid);
        let Some(waiter) = self.methods.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) else {
            tracing::info!(hub = %d.hub, device = %d.device_id, "method answer matches no call pending on this connection; ignored");
            return;
        };
        let payload = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        let _ = waiter.send((status, payload));
    }

    /// Queues a cloud-to-device message and wakes the device's session if it is connected.
    pub async fn send_c2d(
        &self,
        hub: &str,
        device_id: &str,
        mut properties: Properties,
        body: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<String, DpsError> {
        if body.len() > self.config.max_c2d_bytes {
            return Err(DpsError::new(ErrorCode::MessageTooLarge, "Cloud-to-device messages may be at most 64 KB."));
        }
        let (dev, _) = self.twin(hub, device_id).await?;
        let ttl = ttl.unwrap_or(self.config.c2d_default_ttl).min(self.config.c2d_max_ttl);
        let id = uuid::Uuid::new_v4().to_string();
        properties.system.entry("message-id".into()).or_insert_with(|| id.clone());
        properties.system.insert("to".into(), format!("/devices/{}/messages/deviceBound", dev.device_id));
        let now = Timestamp::now();
        let msg = C2dMessage {
            id: id.clone(),
            hub: dev.hub.clone(),
            device_id: dev.device_id.clone(),
            enqueued_time: now.to_azure_string(),
            expiry: now.unix_seconds() + ttl.as_secs() as i64,
            properties,
            body,
        };
        self.store.enqueue_c2d(&msg, self.config.c2d_queue_depth).await.map_err(store_err)?;
        if let Some(live) = self.sessions.get(hub, device_id) {
            let _ = live.tx.try_send(Outbound::CloudToDevice);
        }
        Ok(id)
    }

    pub async fn pending_c2d(&self, d: &HubDevice) -> Result<Vec<C2dMessage>, DpsError> {
        self.store.pending_c2d(&d.hub, &d.device_id, Timestamp::now().unix_seconds()).await.map_err(store_err)
    }

    pub async fn complete_c2d(&self, d: &HubDevice, id: &str) -> Result<(), DpsError> {
        self.store.complete_c2d(&d.hub, &d.device_id, id).await.map_err(store_err).map(|_| ())
    }

    /// Azure's `Device` JSON for the service API.
    pub fn device_json(&self, dev: &DeviceIdentity) -> Value {
        let (connected, state_since) = self.sessions.connection_state(&dev.hub, &dev.device_id);
        let activity = self
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(dev.hub.to_ascii_lowercase(), dev.device_id.to_ascii_lowercase()))
            .map(|t| t.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .map(|t| Timestamp::from_ticks(t).to_azure_string());
        json!({
            "deviceId": dev.device_id,
            "generationId": dev.generation_id,
            "etag": dev.etag,
            "connectionState": if connected { "Connected" } else { "Disconnected" },
            "status": dev.status,
            "statusReason": null,
            // Azure's "never" when the device has not connected (since the server started).
            "connectionStateUpdatedTime": state_since.unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
            "statusUpdatedTime": dev.created_date_time_utc,
            "lastActivityTime": activity.unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
            "cloudToDeviceMessageCount": 0,
            "authentication": authentication_json(dev),
            "capabilities": {"iotEdge": false},
        })
    }

    /// Azure's `Twin` JSON for the service API.
    pub fn twin_json(&self, dev: &DeviceIdentity, twin: &Twin) -> Value {
        let d = self.device_json(dev);
        let (tags, properties) = twin.service_sections();
        json!({
            "deviceId": dev.device_id,
            "etag": twin_etag(twin),
            "deviceEtag": dev.etag,
            "status": dev.status,
            "statusUpdateTime": d["statusUpdatedTime"],
            "connectionState": d["connectionState"],
            "lastActivityTime": d["lastActivityTime"],
            "cloudToDeviceMessageCount": 0,
            "authenticationType": d["authentication"]["type"],
            "x509Thumbprint": d["authentication"]["x509Thumbprint"],
            "version": twin.version,
            "tags": tags,
            "properties": properties,
            "capabilities": {"iotEdge": false},
        })
    }

    /// Creates or replaces a device identity (service API `PUT /devices/{id}`).
    pub async fn put_device(
        &self,
        hub: &str,
        device_id: &str,
        body: &[u8],
        if_match: Option<String>,
    ) -> Result<DeviceIdentity, DpsError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| DpsError::bad_request(format!("Malformed device JSON: {e}")))?;
        if let Some(id) = v.get("deviceId").and_then(Value::as_str) {
            if id != device_id {
                return Err(DpsError::bad_request("deviceId in the body does not match the path."));
            }
        }
        fleetgate_core::ids::RegistrationId::parse(device_id)?;
        let status: DeviceStatus = match v.get("status") {
            None | Some(Value::Null) => DeviceStatus::Enabled,
            Some(s) => serde_json::from_value(s.clone())
                .map_err(|_| DpsError::bad_request("status must be enabled or disabled."))?,
        };
        let key = |name: &str| -> Result<Option<String>, DpsError> {
            match v
                .pointer(&format!("/authentication/symmetricKey/{name}"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                Some(k) => Ok(Some(SymmetricKey::parse_user_key(k)?.to_base64())),
                None => Ok(None),
            }
        };
        let (primary, secondary) = (key("primaryKey")?, key("secondaryKey")?);
        let x509 = x509_credentials(&v)?;
        let (hub_s, id) = (hub.to_owned(), device_id.to_owned());
        let now = Timestamp::now();
        // Decided in the store's transaction, from the identity it replaces.
        let credentials_changed = Arc::new(AtomicBool::new(false));
        let changed = credentials_changed.clone();
        let result = self
            .store
            .update_device(
                hub,
                device_id,
                Box::new(move |cur| {
                    let existing = cur.as_ref().map(|(d, _)| d);
                    if let Some(m) = if_match.as_deref().map(str::trim).filter(|m| !m.is_empty() && *m != "*") {
                        if existing.map(|d| d.etag.trim_matches('"')) != Some(m.trim_matches('"')) {
                            return Err(DpsError::new(
                                ErrorCode::PreconditionFailed,
                                "The device etag does not match (precondition failed).",
                            ));
                        }
                    } else if if_match.is_none() && existing.is_some() {
                        // Azure: PUT without If-Match creates only.
                        return Err(DpsError::new(
                            ErrorCode::DeviceAlreadyExists,
                            "A device with this id already exists.",
                        ));
                    }
                    let credentials = match &x509 {
                        // An update of a certificateAuthority identity keeps the CAs it was provisioned with.
                        Some(DeviceCredentials::CertificateAuthority(_)) => DeviceCredentials::CertificateAuthority(
                            existing.map(|d| d.ca_certificates.clone()).unwrap_or_default(),
                        ),
                        Some(c) => c.clone(),
                        None => DeviceCredentials::Keys(
                            [
                                primary.clone().or_else(|| existing.map(|d| d.primary_key.clone())),
                                secondary.clone().or_else(|| existing.map(|d| d.secondary_key.clone())),
                            ]
                            .into_iter()
                            .map(|k| {
                                k.and_then(|k| SymmetricKey::from_base64(&k).ok())
                                    .filter(|k| !k.as_bytes().is_empty())
                                    .unwrap_or_else(SymmetricKey::generate)
                            })
                            .collect(),
                        ),
                    };
                    let mut dev = DeviceIdentity::provisioned_with(existing, &hub_s, &id, credentials, now);
                    dev.status = status;
                    changed.store(existing.is_some_and(|old| !old.same_credentials(&dev)), Ordering::Relaxed);
                    let twin = cur.map(|(_, t)| t).unwrap_or_default();
                    Ok(Some((dev, twin)))
                }),
            )
            .await
            .map_err(store_err)?;
        let (dev, _) = result.ok_or_else(DpsError::internal)?;
        // A disabled device, or one whose keys, thumbprints or CAs changed, keeps no connection
        // opened before: the old credentials may be the reason for the change.
        let changed = credentials_changed.load(Ordering::Relaxed);
        if dev.status == DeviceStatus::Disabled || changed {
            if changed {
                tracing::info!(hub = %hub, device = %dev.device_id, "device credentials changed; closing its connection");
            }
            self.sessions.close(hub, device_id);
        }
        Ok(dev)
    }

    /// Ends the device's live connection on `hub`, if any: its identity was changed outside the
    /// hub's service API (DPS re-provisioning gave it other credentials or moved it away).
    pub fn close_session(&self, hub: &str, device_id: &str) {
        self.sessions.close(hub, device_id);
    }

    pub async fn delete_device(&self, hub: &str, device_id: &str, if_match: Option<String>) -> Result<(), DpsError> {
        let id = device_id.to_owned();
        self.store
            .update_device(
                hub,
                device_id,
                Box::new(move |cur| {
                    let (dev, _) = cur.ok_or_else(|| not_found(&id))?;
                    if let Some(m) = if_match.as_deref().map(str::trim).filter(|m| !m.is_empty() && *m != "*") {
                        if dev.etag.trim_matches('"') != m.trim_matches('"') {
                            return Err(DpsError::new(
                                ErrorCode::PreconditionFailed,
                                "The device etag does not match (precondition failed).",
                            ));
                        }
                    }
                    Ok(None)
                }),
            )
            .await
            .map_err(store_err)?;
        self.sessions.close(hub, device_id);
        Ok(())
    }

    pub async fn devices(&self, hub: &str, offset: usize, limit: usize) -> Result<Vec<DeviceIdentity>, DpsError> {
        self.store.devices(hub, offset, limit).await.map_err(store_err)
    }

    /// Twins as the service API answers them, in creation order (the hub query reads these).
    pub async fn twins_json(&self, hub: &str, offset: usize, limit: usize) -> Result<Vec<Value>, DpsError> {
        let twins = self.store.twins(hub, offset, limit).await.map_err(store_err)?;
        Ok(twins.iter().map(|(d, t)| self.twin_json(d, t)).collect())
    }

    /// Azure's `RegistryStatistics`: counted by the store.
    pub async fn registry_statistics(&self, hub: &str) -> Result<Value, DpsError> {
        let c = self.store.device_counts(hub).await.map_err(store_err)?;
        Ok(json!({
            "totalDeviceCount": c.total,
            "enabledDeviceCount": c.enabled,
            "disabledDeviceCount": c.total.saturating_sub(c.enabled),
        }))
    }

    /// Azure's `ServiceStatistics`: the devices connected now.
    pub fn service_statistics(&self, hub: &str) -> Value {
        json!({"connectedDeviceCount": self.sessions.count_of(hub)})
    }
}

/// Azure's `AuthenticationMechanism` of a device identity.
fn authentication_json(dev: &DeviceIdentity) -> Value {
    let key = |k: &str| if k.is_empty() { Value::Null } else { Value::String(k.to_owned()) };
    let kind = match dev.authentication_type {
        AuthenticationType::Sas => "sas",
        AuthenticationType::SelfSigned => "selfSigned",
        AuthenticationType::CertificateAuthority => "certificateAuthority",
    };
    json!({
        "symmetricKey": {"primaryKey": key(&dev.primary_key), "secondaryKey": key(&dev.secondary_key)},
        "x509Thumbprint": {"primaryThumbprint": dev.primary_thumbprint, "secondaryThumbprint": dev.secondary_thumbprint},
        "type": kind,
    })
}

/// The X.509 credentials of a service API device body (`authentication.type` `selfSigned` with
/// `x509Thumbprint`, or `certificateAuthority`); `None` for SAS.
fn x509_credentials(v: &Value) -> Result<Option<DeviceCredentials>, DpsError> {
    let kind = v.pointer("/authentication/type").and_then(Value::as_str).unwrap_or("sas");
    if kind.eq_ignore_ascii_case("sas") {
        return Ok(None);
    }
    if kind.eq_ignore_ascii_case("certificateAuthority") {
        return Ok(Some(DeviceCredentials::CertificateAuthority(Vec::new())));
    }
    if !kind.eq_ignore_ascii_case("selfSigned") {
        return Err(DpsError::bad_request("authentication.type must be sas, selfSigned or certificateAuthority."));
    }
    let thumbprint = |name: &str| -> Result<Option<String>, DpsError> {
        let Some(t) = v
            .pointer(&format!("/authentication/x509Thumbprint/{name}"))
            .and_then(Value::as_str)
            .map(|t| t.replace(':', ""))
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        if !(t.len() == 40 || t.len() == 64) || !t.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(DpsError::bad_request(format!("{name} must be a SHA-1 or SHA-256 thumbprint in hex.")));
        }
        Ok(Some(t.to_ascii_uppercase()))
    };
    let (primary, secondary) = (thumbprint("primaryThumbprint")?, thumbprint("secondaryThumbprint")?);
    if primary.is_none() && secondary.is_none() {
        return Err(DpsError::bad_request("A selfSigned device needs x509Thumbprint.primaryThumbprint."));
    }
    Ok(Some(DeviceCredentials::SelfSigned { primary, secondary }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_rids_are_128_random_bits() {
        let rids: std::collections::HashSet<String> = (0..1000).map(|_| new_method_rid()).collect();
        assert_eq!(rids.len(), 1000);
        for rid in &rids {
            assert!(rid.len() == 32 && rid.bytes().all(|b| b.is_ascii_hexdigit()), "{rid}");
            assert!(fleetgate_core::topic::request_id_ok(rid), "echoable as it is");
        }
    }

    /// Issue 12 item 4: a change committed while a CONNECT is between [`Hub::authenticate`] and
    /// [`Hub::connect_session`] finds no session to close; the session must then be refused.
    #[tokio::test]
    async fn a_change_committed_while_a_device_connects_refuses_its_session() {
        let store = Arc::new(fleetgate_store::SqliteStore::in_memory().unwrap());
        let hub = Hub::new(store.clone(), HubConfig::default());
        let host = "hub.example.net";
        fleetgate_store::Store::add_hub(&*store, &LinkedHub::new(host, SymmetricKey::generate().to_base64()))
            .await
            .unwrap();
        let key = SymmetricKey::generate();
        let device = |key: &SymmetricKey, status: &str| {
            json!({"deviceId": "dev", "status": status, "authentication": {"type": "sas", "symmetricKey": {
                "primaryKey": key.to_base64(), "secondaryKey": key.to_base64()}}})
            .to_string()
        };
        hub.put_device(host, "dev", device(&key, "enabled").as_bytes(), None).await.unwrap();
        let token = || {
            let expiry = Timestamp::now().unix_seconds() + 600;
            fleetgate_core::sas::build_token(&key, &format!("{host}/devices/dev"), expiry, None)
        };
        let authenticate = || async {
            match hub.authenticate(host, "dev", Some(&token()), None, None).await {
                Authentication::Identified(d) => d,
                other => panic!("not identified: {other:?}"),
            }
        };
        for (what, change) in [
            ("credentials changed", device(&SymmetricKey::generate(), "enabled")),
            ("disabled", device(&key, "disabled")),
        ] {
            let connecting = authenticate().await;
            hub.put_device(host, "dev", change.as_bytes(), Some("*".into())).await.unwrap();
            assert!(hub.connect_session(&connecting).is_none(), "{what}: session refused");
            assert!(hub.sessions.get(host, "dev").is_none(), "{what}");
            hub.put_device(host, "dev", device(&key, "enabled").as_bytes(), Some("*".into())).await.unwrap();
        }
        // DPS re-provisioning reports its changes through `close_session`.
        let connecting = authenticate().await;
        hub.close_session(host, "dev");
        assert!(hub.connect_session(&connecting).is_none(), "re-provisioned: session refused");
        // Deleted.
        let connecting = authenticate().await;
        hub.delete_device(host, "dev", None).await.unwrap();
        assert!(hub.connect_session(&connecting).is_none(), "deleted: session refused");
        // Nothing changed: the session is registered.
        hub.put_device(host, "dev", device(&key, "enabled").as_bytes(), None).await.unwrap();
        let connecting = authenticate().await;
        let handle = hub.connect_session(&connecting).expect("registered");
        assert_eq!(hub.sessions.get(host, "dev").map(|l| l.id), Some(handle.id));
    }

    #[test]
    fn a_pending_call_is_named_by_hub_device_connection_and_rid() {
        let a = PendingMethod::new("Hub-A", "Dev-1", 7, "r");
        assert_eq!(a, PendingMethod::new("hub-a", "dev-1", 7, "r"), "ids are case-insensitive");
        for other in [
            PendingMethod::new("hub-b", "dev-1", 7, "r"),
            PendingMethod::new("hub-a", "dev-2", 7, "r"),
            PendingMethod::new("hub-a", "dev-1", 8, "r"),
            PendingMethod::new("hub-a", "dev-1", 7, "R"),
        ] {
            assert_ne!(a, other);
        }
    }
}
