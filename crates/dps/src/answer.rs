//! What a device is answered, whatever carried its request: the status, the polling hint and
//! the `RegistrationOperationStatus` body of a register or operation-status request. MQTT puts
//! them in a response topic, HTTPS in a status line and headers; the decision is made here once.

use fleetgate_core::registration::{assigning_status, RegistrationRecord, RegistrationStatus};
use fleetgate_core::AzureError;
use serde_json::Value;

use crate::{DeviceAuth, Provisioning};

/// Seconds a device is told to wait before polling an operation still in progress (or retrying
/// after 429/5xx). Two, since C# raises anything lower to two and Python waits two before its
/// first poll anyway.
pub const POLL_RETRY_AFTER_SECS: u32 = 2;

/// A successful answer: `200` with the final state or `202` + `retry-after` while assigning.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u32>,
    pub body: Value,
}

/// Registers the device and phrases the outcome: the final record at once when the instance
/// answers immediately, else `202 assigning` and the operation id to poll. A decision still
/// pending (the record says `assigning`) is always a 202.
pub async fn register(dps: &Provisioning, auth: &DeviceAuth, payload: Option<Value>) -> Result<Answer, AzureError> {
    let metrics = &fleetgate_metrics::METRICS;
    if let Err(e) = dps.admit_registration() {
        metrics.registration("throttled");
        metrics.throttle("registration");
        return Err(e);
    }
    let started = std::time::Instant::now();
    let outcome = dps.register(auth, payload).await;
    metrics.registration_seconds.observe(started.elapsed().as_secs_f64());
    let outcome = outcome.inspect_err(|_| metrics.registration("error"))?;
    let record = &outcome.record;
    let outcome_label = match record.status {
        RegistrationStatus::Assigned => "assigned",
        RegistrationStatus::Assigning => "assigning",
        RegistrationStatus::Disabled => "disabled",
        _ => "failed",
    };
    {
        use fleetgate_core::audit::{AuditCategory, AuditEntry, Outcome};
        let ok = matches!(record.status, RegistrationStatus::Assigned | RegistrationStatus::Assigning);
        let mut e = AuditEntry::new(
            AuditCategory::DeviceOperations,
            "register",
            &record.registration_id,
            if ok { Outcome::Success } else { Outcome::Failure },
        )
        .reason(format!(
            "{outcome_label}{}",
            record.assigned_hub.as_deref().map(|h| format!(" to {h}")).unwrap_or_default()
        ));
        if let Some(m) = &record.error_message {
            e = e.reason(format!("{outcome_label}: {m}"));
        }
        dps.audit().record(e);
    }
    metrics.registration(outcome_label);
    Ok(if record.status == RegistrationStatus::Assigning {
        still_assigning(record)
    } else if dps.config().immediate_assignment {
        Answer { status: 200, retry_after: None, body: record.operation_status() }
    } else {
        Answer {
            status: 202,
            retry_after: Some(POLL_RETRY_AFTER_SECS),
            body: assigning_status(&record.operation_id, &record.registration_id),
        }
    })
}

/// The state of an operation the device started with a register request: 200 once decided,
/// 202 + `retry-after` while still assigning.
pub async fn operation_status(dps: &Provisioning, auth: &DeviceAuth, operation_id: &str) -> Result<Answer, AzureError> {
    let record = dps.operation_status(auth, operation_id).await?;
    Ok(if record.status == RegistrationStatus::Assigning {
        still_assigning(&record)
    } else {
        Answer { status: 200, retry_after: None, body: record.operation_status() }
    })
}

fn still_assigning(record: &RegistrationRecord) -> Answer {
    Answer { status: 202, retry_after: Some(POLL_RETRY_AFTER_SECS), body: record.operation_status() }
}

/// The retry hint that goes with an error: 429 and 5xx invite a retry, nothing else does. A
/// refusal that knows its wait (a throttled registration: until the quota frees a slot) says so;
/// otherwise the polling interval.
pub fn error_retry_after(e: &AzureError) -> Option<u32> {
    let status = e.status();
    (status == 429 || status >= 500).then(|| e.retry_after.unwrap_or(POLL_RETRY_AFTER_SECS))
}
