//! A store that fails on demand, for tests of what the server answers when storage breaks (a full
//! disk, an I/O error, a locked file): [`FaultyStore`] passes every call to the store it wraps
//! unless its [`Faults`] switch says reads or writes fail, then answers a backend error without
//! touching the inner store. The audit trail (a file of its own) is passed through, so a test
//! can still read what was recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use fleetgate_core::audit::{AuditEntry, AuditQuery};
use fleetgate_core::device::DeviceIdentity;
use fleetgate_core::enrollment::{EnrollmentGroup, IndividualEnrollment};
use fleetgate_core::message::{C2dMessage, ReceivedEvent};
use fleetgate_core::policy::AccessPolicy;
use fleetgate_core::registration::RegistrationRecord;
use fleetgate_core::twin::Twin;

use crate::{
    AssignedDevice, AuditSink, DeviceQueue, DeviceRegistry, DeviceUpdate, EnrollmentStore, EnrollmentUpdate, EventPage,
    EventStream, GroupUpdate, Health, HubAllocation, InstanceStore, LinkedHub, RegistrationStore, Store, StoreError,
    StoreResult,
};

/// The switch of a [`FaultyStore`]; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    reads: Arc<AtomicBool>,
    writes: Arc<AtomicBool>,
}

impl Faults {
    /// Makes every read fail (`true`) or work again.
    pub fn fail_reads(&self, on: bool) {
        self.reads.store(on, Ordering::SeqCst);
    }

    /// Makes every write fail (`true`) or work again, as a full disk does.
    pub fn fail_writes(&self, on: bool) {
        self.writes.store(on, Ordering::SeqCst);
    }

    /// Makes everything fail (`true`) or work again.
    pub fn fail_all(&self, on: bool) {
        self.fail_reads(on);
        self.fail_writes(on);
    }

    fn read(&self) -> StoreResult<()> {
        if self.reads.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("injected read failure".into()));
        }
        Ok(())
    }

    fn write(&self) -> StoreResult<()> {
        if self.writes.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        Ok(())
    }
}

pub struct FaultyStore {
    inner: Arc<dyn Store>,
    faults: Faults,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>, faults: Faults) -> Self {
        Self { inner, faults }
    }
}

#[async_trait]
impl InstanceStore for FaultyStore {
    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        self.faults.read()?;
        self.inner.setting(key).await
    }
    async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.set_setting(key, value).await
    }
    async fn hubs(&self) -> StoreResult<Vec<LinkedHub>> {
        self.faults.read()?;
        self.inner.hubs().await
    }
    async fn add_hub(&self, hub: &LinkedHub) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.add_hub(hub).await
    }
    async fn set_hub_allocation(&self, host_name: &str, allocation: &HubAllocation) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.set_hub_allocation(host_name, allocation).await
    }
    async fn remove_hub(&self, host_name: &str) -> StoreResult<crate::HubRemoval> {
        self.faults.write()?;
        self.inner.remove_hub(host_name).await
    }
    async fn policies(&self, owner: &str) -> StoreResult<Vec<AccessPolicy>> {
        self.faults.read()?;
        self.inner.policies(owner).await
    }
    async fn set_policies(&self, owner: &str, policies: &[AccessPolicy]) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.set_policies(owner, policies).await
    }
}

#[async_trait]
impl EnrollmentStore for FaultyStore {
    async fn enrollment(&self, registration_id: &str) -> StoreResult<Option<IndividualEnrollment>> {
        self.faults.read()?;
        self.inner.enrollment(registration_id).await
    }
    async fn enrollment_ids(&self) -> StoreResult<Vec<String>> {
        self.faults.read()?;
        self.inner.enrollment_ids().await
    }
    async fn enrollments(&self, offset: usize, limit: usize) -> StoreResult<Vec<IndividualEnrollment>> {
        self.faults.read()?;
        self.inner.enrollments(offset, limit).await
    }
    async fn upsert_enrollment(
        &self,
        registration_id: &str,
        update: EnrollmentUpdate,
    ) -> StoreResult<IndividualEnrollment> {
        self.faults.write()?;
        self.inner.upsert_enrollment(registration_id, update).await
    }
    async fn delete_enrollment(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.delete_enrollment(registration_id, if_match).await
    }
    async fn group(&self, id: &str) -> StoreResult<Option<EnrollmentGroup>> {
        self.faults.read()?;
        self.inner.group(id).await
    }
    async fn groups(&self) -> StoreResult<Vec<EnrollmentGroup>> {
        self.faults.read()?;
        self.inner.groups().await
    }
    async fn upsert_group(&self, id: &str, update: GroupUpdate) -> StoreResult<EnrollmentGroup> {
        self.faults.write()?;
        self.inner.upsert_group(id, update).await
    }
    async fn delete_group(&self, id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.delete_group(id, if_match).await
    }
}

#[async_trait]
impl RegistrationStore for FaultyStore {
    async fn registration(&self, registration_id: &str) -> StoreResult<Option<RegistrationRecord>> {
        self.faults.read()?;
        self.inner.registration(registration_id).await
    }
    async fn assignment_inputs(
        &self,
        registration_id: &str,
    ) -> StoreResult<(Option<RegistrationRecord>, Vec<LinkedHub>)> {
        self.faults.read()?;
        self.inner.assignment_inputs(registration_id).await
    }
    async fn registrations_of_group(
        &self,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> StoreResult<Vec<RegistrationRecord>> {
        self.faults.read()?;
        self.inner.registrations_of_group(group_id, offset, limit).await
    }
    async fn delete_registration(&self, registration_id: &str, if_match: Option<&str>) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.delete_registration(registration_id, if_match).await
    }
    async fn put_registration(&self, record: &RegistrationRecord) -> StoreResult<()> {
        self.faults.write()?;
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
        self.faults.write()?;
        self.inner.commit_assignment(record, hub, device_id, device, moved_from).await
    }
}

#[async_trait]
impl DeviceRegistry for FaultyStore {
    async fn device(&self, hub: &str, device_id: &str) -> StoreResult<Option<DeviceIdentity>> {
        self.faults.read()?;
        self.inner.device(hub, device_id).await
    }
    async fn devices(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<DeviceIdentity>> {
        self.faults.read()?;
        self.inner.devices(hub, offset, limit).await
    }
    async fn twin(&self, hub: &str, device_id: &str) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
        self.faults.read()?;
        self.inner.twin(hub, device_id).await
    }
    async fn twins(&self, hub: &str, offset: usize, limit: usize) -> StoreResult<Vec<(DeviceIdentity, Twin)>> {
        self.faults.read()?;
        self.inner.twins(hub, offset, limit).await
    }
    async fn device_counts(&self, hub: &str) -> StoreResult<crate::DeviceCounts> {
        self.faults.read()?;
        self.inner.device_counts(hub).await
    }
    async fn update_device(
        &self,
        hub: &str,
        device_id: &str,
        update: DeviceUpdate,
    ) -> StoreResult<Option<(DeviceIdentity, Twin)>> {
        self.faults.write()?;
        self.inner.update_device(hub, device_id, update).await
    }
}

#[async_trait]
impl DeviceQueue for FaultyStore {
    async fn enqueue_c2d(&self, message: &C2dMessage, max_depth: usize) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.enqueue_c2d(message, max_depth).await
    }
    async fn pending_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<Vec<C2dMessage>> {
        self.faults.write()?;
        self.inner.pending_c2d(hub, device_id, now).await
    }
    async fn c2d_count(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64> {
        self.faults.read()?;
        self.inner.c2d_count(hub, device_id, now).await
    }
    async fn complete_c2d(&self, hub: &str, device_id: &str, id: &str) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.complete_c2d(hub, device_id, id).await
    }
    async fn purge_c2d(&self, hub: &str, device_id: &str, now: i64) -> StoreResult<u64> {
        self.faults.write()?;
        self.inner.purge_c2d(hub, device_id, now).await
    }
    async fn receive_c2d(&self, hub: &str, device_id: &str, lock: &crate::Lock) -> StoreResult<Option<C2dMessage>> {
        self.faults.write()?;
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
        self.faults.write()?;
        self.inner.settle_c2d(hub, device_id, token, how, now).await
    }
    async fn receive_feedback(
        &self,
        hub: &str,
        lock: &crate::Lock,
        created_after: i64,
        max: usize,
    ) -> StoreResult<Option<crate::FeedbackBatch>> {
        self.faults.write()?;
        self.inner.receive_feedback(hub, lock, created_after, max).await
    }
    async fn settle_feedback(&self, hub: &str, token: &str, complete: bool, now: i64) -> StoreResult<bool> {
        self.faults.write()?;
        self.inner.settle_feedback(hub, token, complete, now).await
    }
    async fn mqtt_session(&self, hub: &str, device_id: &str) -> StoreResult<Option<String>> {
        self.faults.read()?;
        self.inner.mqtt_session(hub, device_id).await
    }
    async fn set_mqtt_session(&self, hub: &str, device_id: &str, state: Option<&str>) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.set_mqtt_session(hub, device_id, state).await
    }
}

#[async_trait]
impl EventStream for FaultyStore {
    async fn append_events(&self, events: Vec<ReceivedEvent>) -> StoreResult<Vec<u64>> {
        self.faults.write()?;
        self.inner.append_events(events).await
    }
    async fn events(&self, hub: &str, from: u64, limit: usize) -> StoreResult<EventPage> {
        self.faults.read()?;
        self.inner.events(hub, from, limit).await
    }
    async fn last_event_seq(&self) -> StoreResult<u64> {
        self.faults.read()?;
        self.inner.last_event_seq().await
    }
}

#[async_trait]
impl AuditSink for FaultyStore {
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
impl Health for FaultyStore {
    async fn write_probe(&self) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.write_probe().await
    }
    async fn integrity_check(&self) -> StoreResult<()> {
        self.faults.read()?;
        self.inner.integrity_check().await
    }
}
