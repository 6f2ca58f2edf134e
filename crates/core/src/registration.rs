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
    /// The group the device attested through (`None`: its individual enrollment). Not part of
    /// Azure's service JSON; stored with the record and reported to the device inside
    /// `symmetricKey`.
    #[serde(skip)]
    pub enrollment_group_id: Option<String>,
    /// The operation that produced this state, so a device can poll it.
    #[serde(skip)]
    pub operation_id: String,
    /// Internal: the hub of the first assignment, and the payload the device sent last.
    #[serde(skip)]
    pub internal: RecordInternal,
}

/// What Fleetgate keeps about a registration beyond Azure's JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordInternal {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_payload: Option<Value>,
    /// Set when the device attested with a certificate: reported inside `x509` instead of
    /// `symmetricKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationInfo>,
}

/// What an X.509 registration reports about the certificates involved (Azure's
/// `X509RegistrationResult`, without the group id, which the record holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationInfo {
    /// The device's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_info: Option<crate::x509::CertificateInfo>,
    /// The enrollment group's CA certificate the chain led to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<crate::x509::CertificateInfo>,
}

/// What happens to a device's hub assignment when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Stay on the current hub with the device data there (the policy never re-provisions, or
    /// migrates the data onto the hub it is already on).
    Keep { hub: String, substatus: Substatus },
    /// Stay on the current hub, the device data reset to the enrollment's initial state (the
    /// reset policy on the same hub: Azure's "factory reset without changing IoT hubs").
    Reset { hub: String },
    /// Assign to `hub`; `from` is the hub the identity leaves (removed in the same commit);
    /// `migrate_twin` carries the twin over, otherwise it starts from the initial twin.
    Move { hub: String, substatus: Substatus, from: Option<String>, migrate_twin: bool },
}

/// Azure's reprovisioning rules (docs: "IoT Hub Device reprovisioning concepts" and the
/// `ReprovisionPolicy` definition of the DPS REST API), for a device DPS assigned before (its
/// record names a hub, whatever its later status: a disabled or failed attempt does not remove
/// the identity):
///
/// | updateHubAssignment | migrateDeviceData | allocated hub | outcome                          |
/// |---------------------|-------------------|---------------|----------------------------------|
/// | false               | any               | any           | stays, data kept, substatus kept |
/// | true                | true              | same          | stays, data kept, substatus kept |
/// | true                | false             | same          | stays, data reset: `deviceDataReset` |
/// | true                | true              | another       | moves with its data: `deviceDataMigrated` |
/// | true                | false             | another       | moves, data reset: `deviceDataReset` |
///
/// A device DPS has no assignment for is an initial assignment (`initialAssignment`, or
/// `reprovisionedToInitialAssignment` when the hub already has its identity: decided by the
/// caller, which can see the hub).
pub fn decide_assignment(
    existing: Option<&RegistrationRecord>,
    policy: crate::enrollment::ReprovisionPolicy,
    allocated: &str,
) -> Assignment {
    let Some(current) = existing.and_then(|r| r.assigned_hub.clone()) else {
        return Assignment::Move {
            hub: allocated.to_owned(),
            substatus: Substatus::InitialAssignment,
            from: None,
            migrate_twin: false,
        };
    };
    let kept = existing.and_then(|r| r.substatus).unwrap_or(Substatus::InitialAssignment);
    if !policy.update_hub_assignment {
        return Assignment::Keep { hub: current, substatus: kept };
    }
    if current.eq_ignore_ascii_case(allocated) {
        return if policy.migrate_device_data {
            Assignment::Keep { hub: current, substatus: kept }
        } else {
            Assignment::Reset { hub: current }
        };
    }
    let substatus = if policy.migrate_device_data { Substatus::DeviceDataMigrated } else { Substatus::DeviceDataReset };
    Assignment::Move {
        hub: allocated.to_owned(),
        substatus,
        from: Some(current),
        migrate_twin: policy.migrate_device_data,
    }
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
    /// The next state of a device's record: what carries over from the previous record (the id's
    /// first spelling, creation time, current assignment, substatus, internal data) with a fresh
    /// etag, operation id and update time. The constructors below adjust the rest.
    fn next(
        existing: Option<&RegistrationRecord>,
        registration_id: &RegistrationId,
        enrollment_group_id: Option<&str>,
        status: RegistrationStatus,
        now: Timestamp,
    ) -> Self {
        let now_s = now.to_azure_string();
        RegistrationRecord {
            registration_id: existing
                .map(|r| r.registration_id.clone())
                .unwrap_or_else(|| registration_id.as_str().to_owned()),
            created_date_time_utc: existing.map(|r| r.created_date_time_utc.clone()).unwrap_or_else(|| now_s.clone()),
            assigned_hub: existing.and_then(|r| r.assigned_hub.clone()),
            device_id: existing.and_then(|r| r.device_id.clone()),
            status,
            substatus: existing.and_then(|r| r.substatus),
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: now_s,
            etag: new_registration_etag(),
            payload: None,
            enrollment_group_id: enrollment_group_id.map(str::to_owned),
            operation_id: new_operation_id(),
            internal: existing.map(|r| r.internal.clone()).unwrap_or_default(),
        }
    }

    /// The record after a successful assignment. An existing record for the same device keeps its
    /// creation time and first hub.
    #[allow(clippy::too_many_arguments)]
    pub fn assigned(
        existing: Option<&RegistrationRecord>,
        registration_id: &RegistrationId,
        enrollment_group_id: Option<&str>,
        device_id: &str,
        hub: &str,
        substatus: Substatus,
        payload: Option<Value>,
        device_payload: Option<Value>,
        now: Timestamp,
    ) -> Self {
        let mut r = Self::next(existing, registration_id, enrollment_group_id, RegistrationStatus::Assigned, now);
        r.assigned_hub = Some(hub.to_owned());
        r.device_id = Some(device_id.to_owned());
        r.substatus = Some(substatus);
        r.payload = payload;
        r.internal = RecordInternal {
            initial_hub: Some(existing.and_then(|e| e.internal.initial_hub.clone()).unwrap_or_else(|| hub.to_owned())),
            device_payload,
            x509: None,
        };
        r
    }

    /// A record for an assignment still being decided (custom allocation): the previous
    /// assignment, if any, stays in place until the decision is committed.
    pub fn assigning(
        existing: Option<&RegistrationRecord>,
        registration_id: &RegistrationId,
        enrollment_group_id: Option<&str>,
        device_payload: Option<Value>,
        now: Timestamp,
    ) -> Self {
        let mut r = Self::next(existing, registration_id, enrollment_group_id, RegistrationStatus::Assigning, now);
        r.internal.device_payload = device_payload;
        r.internal.x509 = None;
        r
    }

    /// A record for a device whose registration failed after it authenticated (Azure keeps one,
    /// with the error, so the operator can see why). A failed attempt does not undo an earlier
    /// assignment: the device identity stays.
    pub fn failed(
        existing: Option<&RegistrationRecord>,
        registration_id: &RegistrationId,
        enrollment_group_id: Option<&str>,
        status: RegistrationStatus,
        error: &crate::AzureError,
        now: Timestamp,
    ) -> Self {
        let mut r = Self::next(existing, registration_id, enrollment_group_id, status, now);
        r.error_code = Some(error.code.code());
        r.error_message = Some(error.message.clone());
        r
    }

    /// The `registrationState` sent to the device (`DeviceRegistrationResult`): the record plus
    /// the attestation sub-object naming the enrollment group: `symmetricKey`, or `x509` with the
    /// certificate information when the device attested with a certificate.
    pub fn device_result(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("record serializes");
        if let Some(obj) = v.as_object_mut() {
            let mut attestation = match &self.enrollment_group_id {
                Some(g) => json!({ "enrollmentGroupId": g }),
                None => json!({}),
            };
            match &self.internal.x509 {
                Some(x) => {
                    if let (Some(a), Value::Object(info)) =
                        (attestation.as_object_mut(), serde_json::to_value(x).expect("info serializes"))
                    {
                        a.extend(info);
                    }
                    obj.insert("x509".into(), attestation);
                }
                None => {
                    obj.insert("symmetricKey".into(), attestation);
                }
            }
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

    use crate::enrollment::ReprovisionPolicy;

    fn rec(hub: &str, initial: &str) -> RegistrationRecord {
        let id = RegistrationId::parse("dev-1").unwrap();
        let mut r = RegistrationRecord::assigned(
            None,
            &id,
            Some("g"),
            "dev-1",
            hub,
            Substatus::InitialAssignment,
            None,
            None,
            Timestamp::from_unix_seconds(0),
        );
        r.internal.initial_hub = Some(initial.into());
        r
    }

    /// Every policy combination, on the same hub and on another (the table of
    /// [`decide_assignment`]).
    #[test]
    fn assignment_decisions_follow_the_reprovision_policy() {
        let policy = |u, m| ReprovisionPolicy { update_hub_assignment: u, migrate_device_data: m };
        let keep = |sub| Assignment::Keep { hub: "a".into(), substatus: sub };
        let moved = |sub, migrate_twin| Assignment::Move {
            hub: "b".into(),
            substatus: sub,
            from: Some("a".into()),
            migrate_twin,
        };
        let on_a = rec("a", "a");
        use Substatus::*;
        for (update, migrate, allocated, expected) in [
            (false, false, "a", keep(InitialAssignment)),
            (false, false, "b", keep(InitialAssignment)),
            (false, true, "a", keep(InitialAssignment)),
            (false, true, "b", keep(InitialAssignment)),
            (true, true, "A", keep(InitialAssignment)),
            (true, false, "A", Assignment::Reset { hub: "a".into() }),
            (true, true, "b", moved(DeviceDataMigrated, true)),
            (true, false, "b", moved(DeviceDataReset, false)),
        ] {
            assert_eq!(
                decide_assignment(Some(&on_a), policy(update, migrate), allocated),
                expected,
                "update {update}, migrate {migrate}, to {allocated}"
            );
        }
        // A first registration, whatever the policy.
        for (update, migrate) in [(true, true), (true, false), (false, false)] {
            assert_eq!(
                decide_assignment(None, policy(update, migrate), "a"),
                Assignment::Move { hub: "a".into(), substatus: InitialAssignment, from: None, migrate_twin: false }
            );
        }
        // Back to the first hub is a move like any other (Azure's
        // `reprovisionedToInitialAssignment` is for a device DPS does not know about).
        let on_b = rec("b", "a");
        assert_eq!(
            decide_assignment(Some(&on_b), policy(true, true), "a"),
            Assignment::Move {
                hub: "a".into(),
                substatus: DeviceDataMigrated,
                from: Some("b".into()),
                migrate_twin: true
            }
        );
        // A disabled or failed attempt after an assignment leaves the identity where it was.
        for status in [RegistrationStatus::Disabled, RegistrationStatus::Failed] {
            let mut r = rec("a", "a");
            r.status = status;
            assert_eq!(decide_assignment(Some(&r), policy(true, true), "a"), keep(InitialAssignment));
            assert!(matches!(
                decide_assignment(Some(&r), policy(true, true), "b"),
                Assignment::Move { from: Some(_), .. }
            ));
        }
        // A record without a hub (never assigned) has nothing to keep.
        let mut never = rec("a", "a");
        never.assigned_hub = None;
        never.status = RegistrationStatus::Disabled;
        assert!(matches!(
            decide_assignment(Some(&never), policy(true, true), "b"),
            Assignment::Move { from: None, .. }
        ));
    }

    #[test]
    fn re_registration_keeps_creation_time_and_first_hub() {
        let id = RegistrationId::parse("Dev-1").unwrap();
        let r1 = RegistrationRecord::assigned(
            None,
            &id,
            Some("grp"),
            "Dev-1",
            "hub",
            Substatus::InitialAssignment,
            None,
            None,
            Timestamp::from_unix_seconds(0),
        );
        assert_eq!(r1.internal.initial_hub.as_deref(), Some("hub"));
        let r2 = RegistrationRecord::assigned(
            Some(&r1),
            &id,
            Some("grp"),
            "Dev-1",
            "hub2",
            Substatus::DeviceDataMigrated,
            None,
            None,
            Timestamp::from_unix_seconds(5),
        );
        assert_eq!(r2.created_date_time_utc, r1.created_date_time_utc);
        assert_ne!(r2.last_updated_date_time_utc, r1.last_updated_date_time_utc);
        assert_ne!(r2.etag, r1.etag);
        assert_eq!(r2.internal.initial_hub.as_deref(), Some("hub"));
    }

    #[test]
    fn device_result_shape() {
        let id = RegistrationId::parse("dev-1").unwrap();
        let r = RegistrationRecord::assigned(
            None,
            &id,
            Some("grp"),
            "dev-1",
            "hub",
            Substatus::InitialAssignment,
            None,
            None,
            Timestamp::from_unix_seconds(0),
        );
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
        assert!(svc.get("symmetricKey").is_none() && svc.get("operationId").is_none() && svc.get("internal").is_none());
        // Individual enrollments report an empty symmetricKey object.
        let ind = RegistrationRecord::assigned(
            None,
            &id,
            None,
            "dev-1",
            "hub",
            Substatus::InitialAssignment,
            None,
            None,
            Timestamp::from_unix_seconds(0),
        );
        assert_eq!(ind.device_result()["symmetricKey"], json!({}));
        // X.509 attestations report `x509` instead.
        let mut x = r.clone();
        x.internal.x509 = Some(X509RegistrationInfo { certificate_info: None, signing_certificate_info: None });
        let st = x.device_result();
        assert_eq!(st["x509"], json!({"enrollmentGroupId": "grp"}));
        assert!(st.get("symmetricKey").is_none());
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
