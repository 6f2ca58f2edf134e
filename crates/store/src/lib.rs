//! Fleetgate's persistent state behind a trait per role ([`InstanceStore`], [`EnrollmentStore`],
//! [`RegistrationStore`], [`DeviceRegistry`], [`DeviceQueue`], [`EventStream`], [`AuditSink`],
//! [`Health`]); [`Store`] is all of them together.
//!
//! The embedded default is SQLite in the data directory ([`SqliteStore`]), with telemetry in an
//! append-only segment log beside it ([`EventLog`]). Every method that
//! changes more than one thing does so in a single transaction: a registration record and the
//! device identity it creates are committed together or not at all.
#![forbid(unsafe_code)]

mod audit_log;
mod c2d_queue;
pub mod cache;
mod caching;
pub mod disk;
pub mod event_log;
mod faulty;
mod sqlite;

use async_trait::async_trait;
use fleetgate_core::audit::{AuditEntry, AuditQuery};
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::{EnrollmentGroup, IndividualEnrollment};
use fleetgate_core::message::{C2dMessage, ReceivedEvent, TelemetryEvent};
use fleetgate_core::policy::AccessPolicy;
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::twin::Twin;
use fleetgate_core::AzureError;

pub use audit_log::{AuditLog, AuditOptions, FAILURE_LINES_PER_MINUTE};
pub use caching::CachingStore;
pub use event_log::{EventLog, EventLogOptions};
pub use faulty::{Faults, FaultyStore};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The change was refused by a domain rule (e.g. an etag precondition); nothing was written.
    #[error(transparent)]
    Rejected(#[from] AzureError),
    /// The backend failed; nothing was written.
    #[error("storage backend error: {0}")]
    Backend(String),
    /// The backend cannot take writes now (its disk is below the free-space reserve); nothing
    /// was written, and the same request can succeed later: answered as retryable (503).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// What a caller is answered when the store failed it: the domain's refusal as it is; a fault
/// of the store as "retry later" (503, which every SDK retries), never an answer that reads as
/// the device's or the caller's fault, or as permanent. Faults are logged here, once.
impl From<StoreError> for AzureError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Rejected(d) => d,
            StoreError::Backend(msg) => {
                fleetgate_metrics::log_limited!(tracing::Level::ERROR, error = %msg, "store failure");
                AzureError::unavailable()
            }
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "store refused a change (retryable)");
                AzureError::unavailable()
            }
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What [`InstanceStore::remove_hub`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubRemoval {
    Removed,
    NoSuchHub,
    /// The only hub: the instance always has one.
    LastHub,
    /// The hub has this many device identities.
    HasDevices(u64),
}

/// A hub's identity counts (registry statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceCounts {
    pub total: u64,
    pub enabled: u64,
}

/// A read of the telemetry stream.
#[derive(Debug, Default)]
pub struct EventPage {
    pub events: Vec<TelemetryEvent>,
    /// Where the next read continues (the position after the last event looked at).
    pub next: u64,
}

/// A linked IoT hub, its `iothubowner` policy key and its allocation settings.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkedHub {
    pub host_name: String,
    pub owner_key: String,
    #[serde(default)]
    pub allocation: HubAllocation,
}

impl LinkedHub {
    pub fn new(host_name: impl Into<String>, owner_key: impl Into<String>) -> Self {
        Self { host_name: host_name.into(), owner_key: owner_key.into(), allocation: HubAllocation::default() }
    }

    /// The hub as allocation sees it.
    pub fn candidate(&self) -> fleetgate_core::allocation::HubCandidate {
        fleetgate_core::allocation::HubCandidate {
            host_name: self.host_name.clone(),
            allocation_weight: self.allocation.allocation_weight,
            apply_allocation_policy: self.allocation.apply_allocation_policy,
            latency_ms: self.allocation.latency_ms,
        }
    }
}

/// Azure's per-linked-hub allocation settings (and Fleetgate's latency estimate for geoLatency).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubAllocation {
    pub allocation_weight: u32,
    pub apply_allocation_policy: bool,
    pub latency_ms: u32,
}

impl Default for HubAllocation {
    fn default() -> Self {
        Self { allocation_weight: 1, apply_allocation_policy: true, latency_ms: 0 }
    }
}

impl std::fmt::Debug for LinkedHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkedHub").field("host_name", &self.host_name).finish_non_exhaustive()
    }
}

/// How a device settles a cloud-to-device message it holds locked (HTTPS receive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum C2dSettlement {
    /// Done with it: removed (feedback `Success`).
    Complete,
    /// Refused it: removed without retry (feedback `Rejected`).
    Reject,
    /// Give it back: unlocked for a later receive (its delivery stays counted).
    Abandon,
}

/// A receive's lock (C2D messages over HTTPS, feedback batches): taken at `now` under `token`
/// until `until`; an item already delivered `max_deliveries` times is dead-lettered instead.
#[derive(Debug, Clone)]
pub struct Lock {
    pub now: i64,
    pub until: i64,
    pub token: String,
    pub max_deliveries: u32,
}

/// Feedback records handed out together under one lock (one feedback message in Azure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackBatch {
    pub lock_token: String,
    pub records: Vec<fleetgate_core::feedback::FeedbackRecord>,
}

/// Read-modify-write of an enrollment group, run inside the store's transaction: it gets the
/// stored group (if any) and returns the group to store, or a rejection.
pub type GroupUpdate = Box<dyn FnOnce(Option<&EnrollmentGroup>) -> Result<EnrollmentGroup, AzureError> + Send>;

/// The policy owner (see [`InstanceStore::policies`]) of a hub's policies.
pub fn hub_policy_owner(host_name: &str) -> String {
    format!("hub:{}", host_name.to_ascii_lowercase())
}

/// The instance's own configuration: settings (ID scope, keys, …), the linked hubs and the
/// shared access policies of the DPS and of each hub. Small, read on every request (the
/// [`CachingStore`] keeps hubs and policies in memory), changed by the admin path only.
#[async_trait]
pub trait InstanceStore: Send + Sync + 'static {
    /// Instance-wide settings (ID scope, policy keys, …) as key/value text.
    async fn setting(&self, key: &str) -> StoreResult<Option<String>>;
    async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()>;

    async fn hubs(&self) -> StoreResult<Vec<LinkedHub>>;
    /// Adds a hub; an existing hub with the same host name (case-insensitive) is left as it is.
    async fn add_hub(&self, hub: &LinkedHub) -> StoreResult<()>;
    /// Changes a hub's allocation settings. `Ok(false)` when there is no such hub.
    async fn set_hub_allocation(&self, host_name: &str, allocation: &HubAllocation) -> StoreResult<bool>;
    /// Unlinks a hub (case-insensitive name) with its policies and leftover session state, in
    /// one change. Refused, with nothing written, while it is the only hub or has device
    /// identities (they would be left in a hub nothing serves).
    async fn remove_hub(&self, host_name: &str) -> StoreResult<HubRemoval>;

    /// The shared access policies of `owner` (`"dps"` or `"hub:{host}"`), empty when none are
    /// stored yet.
    async fn policies(&self, owner: &str) -> StoreResult<Vec<AccessPolicy>> {
        match self.setting(&format!("policies.{}", owner.to_ascii_lowercase())).await? {
            Some(json) => serde_json::from_str(&json).map_err(|e| StoreError::Backend(e.to_string())),
            None => Ok(Vec::new()),
        }
    }
    async fn set_policies(&self, owner: &str, policies: &[AccessPolicy]) -> StoreResult<()> {
        let json = serde_json::to_string(policies).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.set_setting(&format!("policies.{}", owner.to_ascii_lowercase()), &json).await
    }
}

/// Who may provision: individual enrollments and enrollment groups (DPS service API writes
/// them; registration and the hub's group authentication read them). Writes are
/// read-modify-write closures run inside the store's transaction, so etag checks cannot race.
#[async_trait]
pub trait EnrollmentStore: Send + Sync + 'static {
    async fn enrollment(&self, registration_id: &str) -> StoreResult<Option<IndividualEnrollment>>;
    /// The registration ids (lower-cased) that have an individual enrollment.
    async fn enrollment_ids(&self) -> StoreResult<Vec<String>>;
    /// Individual enrollments, oldest first, paged.
    async fn enrollments(&self, offset: usize, limit: usize) -> StoreResult<Vec<IndividualEnrollment>>;
    /// Atomically applies `update` to the individual enrollment of `registration_id`.
    async fn upsert_enrollment(
        &self,
        registration_id: &str,
        update: EnrollmentUpdate,
    ) -> StoreResult<IndividualEnrollment>;
    async fn delete_enrollment(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool>;

    async fn group(&self, id: &str) -> StoreResult<Option<EnrollmentGroup>>;
    /// All groups, oldest first.
    async fn groups(&self) -> StoreResult<Vec<EnrollmentGroup>>;
    /// Atomically applies `update` to the group `id` and stores the result.
    async fn upsert_group(&self, id: &str, update: GroupUpdate) -> StoreResult<EnrollmentGroup>;
    /// Deletes group `id` if `if_match` (an etag or `*`) matches. `Ok(false)` when absent.
    async fn delete_group(&self, id: &str, if_match: Option<&str>) -> StoreResult<bool>;
}

/// What provisioning decided: the registration record of each device, and the assignment
/// that writes that record together with the device's hub identity. `commit_assignment` also
/// writes [`DeviceRegistry`] and [`DeviceQueue`] state in its transaction, so those three roles
/// are always served by one backend (see [`Registry`]).
#[async_trait]
pub trait RegistrationStore: Send + Sync + 'static {
    async fn registration(&self, registration_id: &str) -> StoreResult<Option<RegistrationRecord>>;
    /// What an assignment is decided from, read together: the device's registration record (if
    /// any) and the linked hubs (an [`InstanceStore`] read, in the same snapshot where the
    /// backend can).
    async fn assignment_inputs(
        &self,
        registration_id: &str,
    ) -> StoreResult<(Option<RegistrationRecord>, Vec<LinkedHub>)>;
    /// Records of one enrollment group, oldest first, paged.
    async fn registrations_of_group(
        &self,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> StoreResult<Vec<RegistrationRecord>>;
    async fn delete_registration(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool>;
    /// Stores a record that assigns nothing new (a failure after authentication).
    async fn put_registration(&self, record: &RegistrationRecord) -> StoreResult<()>;
    /// Stores an assignment in one transaction: the registration record, and the identity and
    /// twin of device `device_id` on `hub` as `device` makes them from the ones stored there now
    /// (`None` when absent; it decides in the transaction, so a concurrent change is never
    /// overwritten unseen). `moved_from` (hub, device id) is removed in the same transaction: a
    /// device re-provisioned to another hub is never on two hubs and never on none.
    async fn commit_assignment(
        &self,
        record: &RegistrationRecord,
        hub: &str,
        device_id: &str,
        device: AssignedDevice,
        moved_from: Option<(&str, &str)>,
    ) -> StoreResult<()>;
}

/// The hub's identity registry: device identities and their twins, per hub (the hub's
/// authentication, registry and twin APIs).
#[async_trait]
pub trait DeviceRegistry: Send + Sync + 'static {
    async fn device(&self, hub: &str, device_id: &str) -> StoreResult<Option<DeviceIdentity>>;
    /// Devices of a hub, oldest first, paged.
    async fn devices(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<DeviceIdentity>>;
    async fn twin(&self, hub: &str, device_id: &str) -> StoreResult<Option<(DeviceIdentity, Twin)>>;
    /// Identities with their twins, in creation order (the hub query pages through them).
    async fn twins(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<(DeviceIdentity, Twin)>>;
    /// How many identities the hub has, and how many are enabled, counted by the store (the
    /// registry statistics), not by reading them.
    async fn device_counts(&self, hub: &str) -> StoreResult<DeviceCounts>;
    /// Atomically replaces (Some) or deletes (None) a device and its twin, given the current ones.
    async fn update_device(
        &self,
        hub: &str,
        device_id: &str,
        update: DeviceUpdate,
    ) -> StoreResult<Option<(DeviceIdentity, Twin)>>;
}

/// Per-device state that is not the identity: the cloud-to-device queue (enqueue, delivery
/// over MQTT and the HTTPS receive/lock/settle cycle, purge, count), the hub's C2D feedback
/// records, and the persistent MQTT session of CleanSession 0 clients.
#[async_trait]
pub trait DeviceQueue: Send + Sync + 'static {
    /// Queues a cloud-to-device message unless the device already has `max_depth` pending.
    async fn enqueue_c2d(&self, message: &C2dMessage, max_depth: usize) -> StoreResult<()>;
    /// Undelivered, unexpired messages of a device, oldest first (expired ones are dropped).
    async fn pending_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<Vec<C2dMessage>>;
    /// How many unexpired messages wait for a device (Azure's `cloudToDeviceMessageCount`).
    async fn c2d_count(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64>;
    /// Removes a delivered message. `Ok(false)` when it was not queued.
    async fn complete_c2d(&self, hub: &str, device_id: &str, id: &str) -> StoreResult<bool>;
    /// Removes every message queued for a device; returns how many. Each leaves as `Purged`
    /// (feedback if its ack asks for it).
    async fn purge_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64>;
    /// Locks the oldest unlocked, unexpired message of a device under `lock` and counts the
    /// delivery; a message already delivered `lock.max_deliveries` times is dead-lettered
    /// (feedback `DeliveryCountExceeded`) instead. `None`: nothing to deliver.
    async fn receive_c2d(&self, hub: &str, device_id: &str, lock: &Lock) -> StoreResult<Option<C2dMessage>>;
    /// Settles the message locked under `token`. `Ok(false)`: no message holds that lock now.
    async fn settle_c2d(
        &self,
        hub: &str,
        device_id: &str,
        token: &str,
        how: C2dSettlement,
        now: i64,
    ) -> StoreResult<bool>;

    /// Locks up to `max` unlocked feedback records of a hub together under `lock` (after
    /// expiring the hub's messages whose time passed, and dropping records created before
    /// `created_after` or delivered `lock.max_deliveries` times).
    async fn receive_feedback(
        &self,
        hub: &str,
        lock: &Lock,
        created_after: i64,
        max: usize,
    ) -> StoreResult<Option<FeedbackBatch>>;
    /// Completes (deletes) or abandons (unlocks) the feedback batch locked under `token`.
    /// `Ok(false)`: no batch holds that lock now.
    async fn settle_feedback(&self, hub: &str, token: &str, complete: bool, now: i64) -> StoreResult<bool>;

    /// A device's persistent MQTT session state (opaque to the store), kept across connections
    /// and restarts for clients that connect with CleanSession 0.
    async fn mqtt_session(&self, hub: &str, device_id: &str) -> StoreResult<Option<String>>;
    /// Replaces (Some) or forgets (None) a device's persistent MQTT session state.
    async fn set_mqtt_session(&self, hub: &str, device_id: &str, state: Option<&str>) -> StoreResult<()>;
}

/// The telemetry stream: device-to-cloud events appended durably and read back by position
/// (the service API's event readers). Embedded: the segment log ([`EventLog`]).
#[async_trait]
pub trait EventStream: Send + Sync + 'static {
    /// Appends telemetry durably, all or nothing; returns each event's stream position.
    async fn append_events(&self, events: Vec<ReceivedEvent>) -> StoreResult<Vec<u64>>;
    /// Events of a hub from position `from` (inclusive), oldest first, at most `limit`. Positions
    /// are shared by all hubs: the page says where to continue, which may be past its last event.
    async fn events(&self, hub: &str, from: u64, limit: usize) -> StoreResult<EventPage>;
    /// Position of the newest event in the stream (any hub), 0 when there is none.
    async fn last_event_seq(&self) -> StoreResult<u64>;
}

/// The audit trail of security-relevant decisions, written in batches by [`AuditLog`] and
/// read by the service API and the CLI; pruned by age and count.
#[async_trait]
pub trait AuditSink: Send + Sync + 'static {
    /// Appends audit entries in one transaction.
    async fn append_audit(&self, entries: Vec<AuditEntry>) -> StoreResult<()>;
    /// Audit entries matching `query`, oldest first; under a limit, the newest that match.
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>>;
    /// Deletes audit entries older than `before` (an Azure timestamp) and then the oldest
    /// beyond the newest `max_rows`; returns how many were deleted.
    async fn prune_audit(&self, before: &str, max_rows: u64) -> StoreResult<u64>;
}

/// What readiness asks of the backend: can it take a write now, and is its data intact.
#[async_trait]
pub trait Health: Send + Sync + 'static {
    /// A small durable write, as a registration's commit makes: `Ok` means the store can take a
    /// registration now (for readiness). SQLite writes the setting `health.write_probe`.
    async fn write_probe(&self) -> StoreResult<()>;
    /// A check that the stored data is intact (SQLite's `quick_check`), which reads all of it:
    /// run now and then, not per request. `Ok` by default.
    async fn integrity_check(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// Everything a registry backend serves: the roles one transaction may span
/// ([`RegistrationStore::commit_assignment`] writes registration, identity and queue state
/// together). SQLite implements it; PostgreSQL will.
pub trait Registry:
    InstanceStore + EnrollmentStore + RegistrationStore + DeviceRegistry + DeviceQueue + Health
{
}

impl<T: InstanceStore + EnrollmentStore + RegistrationStore + DeviceRegistry + DeviceQueue + Health + ?Sized> Registry
    for T
{
}

/// All roles in one handle, as the server wires a single backend today: every type that
/// implements the roles is a `Store`, so `Arc<dyn Store>` callers call any role's methods. On a
/// concrete type (`SqliteStore`), a method is called with its role trait in scope.
pub trait Store: Registry + EventStream + AuditSink {}

impl<T: Registry + EventStream + AuditSink + ?Sized> Store for T {}

/// Read-modify-write of an individual enrollment inside the store's transaction.
pub type EnrollmentUpdate =
    Box<dyn FnOnce(Option<&IndividualEnrollment>) -> Result<IndividualEnrollment, AzureError> + Send>;

/// The identity and twin an assignment stores, made from the ones present (if any) inside the
/// store's transaction.
pub type AssignedDevice =
    Box<dyn FnOnce(Option<(DeviceIdentity, Twin)>) -> Result<(DeviceIdentity, Twin), AzureError> + Send>;

/// Read-modify-write of one device and its twin inside the store's transaction.
pub type DeviceUpdate =
    Box<dyn FnOnce(Option<(DeviceIdentity, Twin)>) -> Result<Option<(DeviceIdentity, Twin)>, AzureError> + Send>;
