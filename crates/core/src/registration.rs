//! Registration records (Azure's `DeviceRegistrationState`) and the outcome of a registration.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ids::RegistrationId;
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    Unassigned,
    Assigning,
    Assigned,
    Failed,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Substatus {
    InitialAssignment,
    DeviceDataMigrated,
    DeviceDataReset,
    ReprovisionedToInitialAssignment,
}

/// A device's registration record, in the JSON shape of Azure's `DeviceRegistrationState`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    pub registration_id: String,
    pub created_date_time_utc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: RegistrationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    pub last_updated_date_time_utc: String,
    pub etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The group the device attested through. Not part of Azure's service JSON; stored with the
    /// record and reported to the device inside `symmetricKey`.
    #[serde(skip)]
    pub enrollment_group_id: Option<String>,
    /// The operation that produced this state, so a device can poll it.
    #[serde(skip)]
    pub operation_id: String,
}

/// A new registration etag: base64 of a quoted GUID, the form the real service uses.
pub fn new_registration_etag() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\"{}\"", uuid::Uuid::new_v4()))
}

/// A new operation id shaped like Azure's (`<digit>.<16 hex>.<uuid>`); clients treat it as opaque.
pub fn new_operation_id() -> String {
    format!("5.{:016x}.{}", rand::random::<u64>(), uuid::Uuid::new_v4())
}

impl RegistrationRecord {
    /// The record after a successful assignment. An existing record for the same device keeps its
    /// creation time; being assigned again to the same hub keeps its substatus (Azure reports the
    /// same assignment to a device that registers again).
    pub fn assigned(
        existing: Option<&RegistrationRecord>,
        registration_id: &RegistrationId,
        enrollment_group_id: &str,
        hub: &str,
        payload: Option<Value>,
        now: Timestamp,
    ) -> Self {
        let now_s = now.to_azure_string();
        let substatus = match existing {
            Some(prev) if prev.status == RegistrationStatus::Assigned && prev.assigned_hub.as_deref() == Some(hub) => {
                prev.substatus.unwrap_or(Substatus::InitialAssignment)
            }
            _ => Substatus::InitialAssignment,
        };
        RegistrationRecord {
            registration_id: existing
                .map(|r| r.registration_id.clone())
                .unwrap_or_else(|| registration_id.as_str().to_owned()),
            created_date_time_utc: existing.map(|r| r.created_date_time_utc.clone()).unwrap_or_else(|| now_s.clone()),
            assigned_hub: Some(hub.to_owned()),
            device_id: Some(
                existing.and_then(|r| r.device_id.clone()).unwrap_or_else(|| registration_id.as_str().to_owned()),
            ),
            status: RegistrationStatus::Assigned,
            substatus: Some(substatus),
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: now_s,
            etag: new_registration_etag(),
            payload,
            enrollment_group_id: Some(enrollment_group_id.to_owned()),
            operation_id: new_operation_id(),
        }
    }

    /// A record for a device whose registration failed after it authenticated (Azure keeps one,
    /// with the error, so the operator can see why).
    pub fn failed(
        existing: Option<&RegistrationRecord>,
        registration_id: &RegistrationId,
        enrollment_group_id: &str,
        status: RegistrationStatus,
        error: &crate::DpsError,
        now: Timestamp,
    ) -> Self {
        let now_s = now.to_azure_string();
        RegistrationRecord {
            registration_id: existing
                .map(|r| r.registration_id.clone())
                .unwrap_or_else(|| registration_id.as_str().to_owned()),
            created_date_time_utc: existing.map(|r| r.created_date_time_utc.clone()).unwrap_or_else(|| now_s.clone()),
            // A failed attempt does not undo an earlier assignment: the device identity stays.
            assigned_hub: existing.and_then(|r| r.assigned_hub.clone()),
            device_id: existing.and_then(|r| r.device_id.clone()),
            status,
            substatus: existing.and_then(|r| r.substatus),
            error_code: Some(error.code.code()),
            error_message: Some(error.message.clone()),
            last_updated_date_time_utc: now_s,
            etag: new_registration_etag(),
            payload: None,
            enrollment_group_id: Some(enrollment_group_id.to_owned()),
            operation_id: new_operation_id(),
        }
    }

    /// The `registrationState` sent to the device (`DeviceRegistrationResult`): the record plus
    /// the attestation sub-object naming the enrollment group.
    pub fn device_result(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("record serializes");
        if let (Some(obj), Some(g)) = (v.as_object_mut(), &self.enrollment_group_id) {
            obj.insert("symmetricKey".into(), json!({ "enrollmentGroupId": g }));
        }
        v
    }

    /// The top-level `RegistrationOperationStatus` a device receives for this record.
    pub fn operation_status(&self) -> Value {
        json!({
            "operationId": self.operation_id,
            "status": self.status,
            "registrationState": self.device_result(),
        })
    }
}

/// The body of a 202 while an assignment is still being decided.
pub fn assigning_status(operation_id: &str, registration_id: &str) -> Value {
    json!({
        "operationId": operation_id,
        "status": "assigning",
        "registrationState": { "registrationId": registration_id, "status": "assigning" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_assignment_then_same_again() {
        let id = RegistrationId::parse("Dev-1").unwrap();
        let r1 = RegistrationRecord::assigned(None, &id, "grp", "hub", None, Timestamp::from_unix_seconds(0));
        assert_eq!(r1.device_id.as_deref(), Some("Dev-1"));
        assert_eq!(r1.substatus, Some(Substatus::InitialAssignment));
        let r2 = RegistrationRecord::assigned(Some(&r1), &id, "grp", "hub", None, Timestamp::from_unix_seconds(5));
        assert_eq!(r2.created_date_time_utc, r1.created_date_time_utc);
        assert_ne!(r2.last_updated_date_time_utc, r1.last_updated_date_time_utc);
        assert_ne!(r2.etag, r1.etag);
        assert_eq!(r2.assigned_hub, r1.assigned_hub);
    }

    #[test]
    fn device_result_shape() {
        let id = RegistrationId::parse("dev-1").unwrap();
        let r = RegistrationRecord::assigned(None, &id, "grp", "hub", None, Timestamp::from_unix_seconds(0));
        let s = r.operation_status();
        assert_eq!(s["status"], "assigned");
        assert_eq!(s["operationId"], r.operation_id);
        let st = &s["registrationState"];
        assert_eq!(st["assignedHub"], "hub");
        assert_eq!(st["deviceId"], "dev-1");
        assert_eq!(st["substatus"], "initialAssignment");
        assert_eq!(st["symmetricKey"]["enrollmentGroupId"], "grp");
        assert!(st.get("payload").is_none());
        // The service view has no attestation sub-object and no internal fields.
        let svc = serde_json::to_value(&r).unwrap();
        assert!(svc.get("symmetricKey").is_none() && svc.get("operationId").is_none());
    }

    #[test]
    fn ids_look_like_azure() {
        let op = new_operation_id();
        let parts: Vec<_> = op.splitn(3, '.').collect();
        assert_eq!(parts[0], "5");
        assert_eq!(parts[1].len(), 16);
        assert_eq!(parts[2].len(), 36);
        let etag = base64::engine::general_purpose::STANDARD.decode(new_registration_etag()).unwrap();
        assert!(etag.starts_with(b"\"") && etag.ends_with(b"\""));
    }
}
