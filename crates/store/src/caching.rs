//! [`CachingStore`]: keeps the linked hubs and the access policies in memory, which every
//! registration, device connect and service call reads, and passes everything else to the store
//! it wraps.
//!
//! The copies stay true because every change to hubs and policies goes through this one store
//! handle: the server's service API is the only admin path (the CLI calls it), so the write that
//! changes them here also drops the copy, and the next reader loads the new one. A change written
//! by another process to the same database would not be seen until a restart; nothing does that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use fleetgate_core::audit::{AuditEntry, AuditQuery};
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::{EnrollmentGroup, IndividualEnrollment};
use fleetgate_core::message::{C2dMessage, ReceivedEvent};
use fleetgate_core::policy::AccessPolicy;
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::twin::Twin;

use crate::cache::Cached;
use crate::{
    AssignedDevice, AuditSink, DeviceQueue, DeviceRegistry, DeviceUpdate, EnrollmentStore, EnrollmentUpdate, EventPage,
    EventStream, GroupUpdate, Health, HubAllocation, HubRemoval, InstanceStore, LinkedHub, RegistrationStore, Store,
    StoreResult,
};

/// The setting prefix the default [`InstanceStore::policies`] keeps policies under: a write to such a
/// setting changes policies too.
const POLICY_SETTING_PREFIX: &str = "policies.";

pub struct CachingStore {
    inner: Arc<dyn Store>,
    hubs: Cached<Vec<LinkedHub>>,
    /// Policies by owner (lower case). Only owners that have policies are kept: the owner comes
    /// from a request (a token's hub name), and a name that has none must not grow the map.
    policies: RwLock<HashMap<String, Arc<Vec<AccessPolicy>>>>,
    /// Bumped by every policy change: a load that raced with one is used once but not kept.
    policy_generation: AtomicU64,
}

impl CachingStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, hubs: Cached::new(), policies: RwLock::new(HashMap::new()), policy_generation: AtomicU64::new(0) }
    }

    fn forget_policies(&self) {
        let mut map = self.policies.write().unwrap_or_else(|p| p.into_inner());
        self.policy_generation.fetch_add(1, Ordering::SeqCst);
        map.clear();
    }
}

#[async_trait]
impl InstanceStore for CachingStore {
    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        self.inner.setting(key).await
    }
    async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()> {
        let result = self.inner.set_setting(key, value).await;
        if key.to_ascii_lowercase().starts_with(POLICY_SETTING_PREFIX) {
            self.forget_policies();
        }
        result
    }
    async fn hubs(&self) -> StoreResult<Vec<LinkedHub>> {
        Ok(self.hubs.get(|| self.inner.hubs()).await?.as_ref().clone())
    }
    // Every hub change drops the copy whatever its result: a failed write leaves the store as
    // it was, and reloading that is only one read.
    async fn add_hub(&self, hub: &LinkedHub) -> StoreResult<()> {
        let result = self.inner.add_hub(hub).await;
        self.hubs.invalidate();
        result
    }
    async fn set_hub_allocation(&self, host_name: &str, allocation: &HubAllocation) -> StoreResult<bool> {
        let result = self.inner.set_hub_allocation(host_name, allocation).await;
        self.hubs.invalidate();
        result
    }
    async fn remove_hub(&self, host_name: &str) -> StoreResult<HubRemoval> {
        // Removes the hub's policies in the same change.
        let result = self.inner.remove_hub(host_name).await;
        self.hubs.invalidate();
        self.forget_policies();
        result
    }
    async fn policies(&self, owner: &str) -> StoreResult<Vec<AccessPolicy>> {
        let key = owner.to_ascii_lowercase();
        if let Some(p) = self.policies.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(p.as_ref().clone());
        }
        let generation = self.policy_generation.load(Ordering::SeqCst);
        let loaded = self.inner.policies(owner).await?;
        if !loaded.is_empty() {
            let mut map = self.policies.write().unwrap_or_else(|p| p.into_inner());
            if self.policy_generation.load(Ordering::SeqCst) == generation {
                map.insert(key, Arc::new(loaded.clone()));
            }
        }
        Ok(loaded)
    }
    async fn set_policies(&self, owner: &str, policies: &[AccessPolicy]) -> StoreResult<()> {
        let result = self.inner.set_policies(owner, policies).await;
        self.forget_policies();
        result
    }
}

#[async_trait]
impl EnrollmentStore for CachingStore {
    // Everything else passes through.
    async fn enrollment(&self, registration_id: &str) -> StoreResult<Option<IndividualEnrollment>> {
        self.inner.enrollment(registration_id).await
    }
    async fn enrollment_ids(&self) -> StoreResult<Vec<String>> {
        self.inner.enrollment_ids().await
    }
    async fn enrollments(&self, offset: usize, limit: usize) -> StoreResult<Vec<IndividualEnrollment>> {
        self.inner.enrollments(offset, limit).await
    }
    async fn upsert_enrollment(
        &self,
        registration_id: &str,
        update: EnrollmentUpdate,
    ) -> StoreResult<IndividualEnrollment> {
        self.inner.upsert_enrollment(registration_id, update).await
    }
    async fn delete_enrollment(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        self.inner.delete_enrollment(registration_id, if_match).await
    }
    async fn group(&self, id: &str) -> StoreResult<Option<EnrollmentGroup>> {
        self.inner.group(id).await
    }
    async fn groups(&self) -> StoreResult<Vec<EnrollmentGroup>> {
        self.inner.groups().await
    }
    async fn upsert_group(&self, id: &str, update: GroupUpdate) -> StoreResult<EnrollmentGroup> {
        self.inner.upsert_group(id, update).await
    }
    async fn delete_group(&self, id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        self.inner.delete_group(id, if_match).await
    }
}

#[async_trait]
impl RegistrationStore for CachingStore {
    async fn registration(&self, registration_id: &str) -> StoreResult<Option<RegistrationRecord>> {
        self.inner.registration(registration_id).await
    }
    async fn assignment_inputs(
        &self,
        registration_id: &str,
    ) -> StoreResult<(Option<RegistrationRecord>, Vec<LinkedHub>)> {
        Ok((self.inner.registration(registration_id).await?, self.hubs().await?))
    }
    async fn registrations_of_group(
        &self,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> StoreResult<Vec<RegistrationRecord>> {
        self.inner.registrations_of_group(group_id, offset, limit).await
    }
    async fn delete_registration(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        self.inner.delete_registration(registration_id, if_match).await
    }
    async fn put_registration(&self, record: &RegistrationRecord) -> StoreResult<()> {
        self.inner.put_registration(record).await
    }
    async fn commit_assignment(
        &self,
        record: &RegistrationRecord,
        hub: &str,
        device_id: &str,
        device: AssignedDevice,
        moved_from: Option<(&str, &str)>,
    ) -> StoreResult<()> {
        self.inner.commit_assignment(record, hub, device_id, device, moved_from).await
    }
}

#[async_trait]
impl DeviceRegistry for CachingStore {
    async fn device(&self, hub: &str, device_id: &str) -> StoreResult<Option<DeviceIdentity>> {
        self.inner.device(hub, device_id).await
    }
    async fn devices(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<DeviceIdentity>> {
        self.inner.devices(hub, offset, limit).await
    }
    async fn twin(&self, hub: &str, device_id: &str) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
        self.inner.twin(hub, device_id).await
    }
    async fn twins(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<(DeviceIdentity, Twin)>> {
        self.inner.twins(hub, offset, limit).await
    }
    async fn device_counts(&self, hub: &str) -> StoreResult<crate::DeviceCounts> {
        self.inner.device_counts(hub).await
    }
    async fn update_device(
        &self,
        hub: &str,
        device_id: &str,
        update: DeviceUpdate,
    ) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
        self.inner.update_device(hub, device_id, update).await
    }
}

#[async_trait]
impl DeviceQueue for CachingStore {
    async fn enqueue_c2d(&self, message: &C2dMessage, max_depth: usize) -> StoreResult<()> {
        self.inner.enqueue_c2d(message, max_depth).await
    }
    async fn pending_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<Vec<C2dMessage>> {
        self.inner.pending_c2d(hub, device_id, now).await
    }
    async fn c2d_count(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64> {
        self.inner.c2d_count(hub, device_id, now).await
    }
    async fn complete_c2d(&self, hub: &str, device_id: &str, id: &str) -> StoreResult<bool> {
        self.inner.complete_c2d(hub, device_id, id).await
    }
    async fn purge_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64> {
        self.inner.purge_c2d(hub, device_id, now).await
    }
    async fn receive_c2d(&self, hub: &str, device_id: &str, lock: &crate::Lock) -> StoreResult<Option<C2dMessage>> {
        self.inner.receive_c2d(hub, device_id, lock).await
    }
    async fn settle_c2d(
        &self,
        hub: &str,
        device_id: &str,
        token: &str,
        how: crate::C2dSettlement,
        now: i64,
    ) -> StoreResult<bool> {
        self.inner.settle_c2d(hub, device_id, token, how, now).await
    }
    async fn receive_feedback(
        &self,
        hub: &str,
        lock: &crate::Lock,
        created_after: i64,
        max: usize,
    ) -> StoreResult<Option<crate::FeedbackBatch>> {
        self.inner.receive_feedback(hub, lock, created_after, max).await
    }
    async fn settle_feedback(&self, hub: &str, token: &str, complete: bool, now: i64) -> StoreResult<bool> {
        self.inner.settle_feedback(hub, token, complete, now).await
    }
    async fn mqtt_session(&self, hub: &str, device_id: &str) -> StoreResult<Option<String>> {
        self.inner.mqtt_session(hub, device_id).await
    }
    async fn set_mqtt_session(&self, hub: &str, device_id: &str, state: Option<&str>) -> StoreResult<()> {
        self.inner.set_mqtt_session(hub, device_id, state).await
    }
}

#[async_trait]
impl EventStream for CachingStore {
    async fn append_events(&self, events: Vec<ReceivedEvent>) -> StoreResult<Vec<u64>> {
        self.inner.append_events(events).await
    }
    async fn events(&self, hub: &str, from: u64, limit: usize) -> StoreResult<EventPage> {
        self.inner.events(hub, from, limit).await
    }
    async fn last_event_seq(&self) -> StoreResult<u64> {
        self.inner.last_event_seq().await
    }
}

#[async_trait]
impl AuditSink for CachingStore {
    async fn append_audit(&self, entries: Vec<AuditEntry>) -> StoreResult<()> {
        self.inner.append_audit(entries).await
    }
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        self.inner.audit(query).await
    }
    async fn prune_audit(&self, before: &str, max_rows: u64) -> StoreResult<u64> {
        self.inner.prune_audit(before, max_rows).await
    }
}

#[async_trait]
impl Health for CachingStore {
    async fn write_probe(&self) -> StoreResult<()> {
        self.inner.write_probe().await
    }
    async fn integrity_check(&self) -> StoreResult<()> {
        self.inner.integrity_check().await
    }
}
