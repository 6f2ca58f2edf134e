//! Direct methods: a service's call delivered to the device's connection, and the answer
//! accepted only from that connection.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use fleetgate_core::{DpsError, ErrorCode};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::authentication::HubDevice;
use crate::sessions::{MethodCall, Outbound};
use crate::Hub;

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
        let (hub, device) = crate::sessions::key(hub, device);
        Self { hub, device, session, rid: rid.to_owned() }
    }
}

/// A request id for a direct method: 128 random bits from the OS generator (UUID v4) in hex,
/// so no device can answer a call it was not sent. The SDKs echo rids as opaque strings.
fn new_method_rid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The calls awaiting an answer.
#[derive(Default)]
pub(crate) struct PendingCalls(Mutex<HashMap<PendingMethod, MethodWaiter>>);

impl PendingCalls {
    fn insert(&self, key: PendingMethod, waiter: MethodWaiter) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(key, waiter);
    }

    fn remove(&self, key: &PendingMethod) -> Option<MethodWaiter> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key)
    }

    /// Drops the calls sent on connection `session`: their callers learn at once that no answer
    /// can come (their waiter is dropped).
    pub(crate) fn forget_connection(&self, session: u64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.session != session);
    }
}

impl Hub {
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
        self.methods.insert(pending.clone(), wtx);
        if live.tx.try_send(Outbound::Method(Box::new(MethodCall { rid, name: name.to_owned(), payload }))).is_err() {
            self.methods.remove(&pending);
            return Err(offline());
        }
        match tokio::time::timeout(timeout, wrx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                self.methods.remove(&pending);
                Err(DpsError::new(ErrorCode::GatewayTimeout, "The device did not answer the direct method in time."))
            }
        }
    }

    /// A device's answer to a method call, from its connection `session`. It counts only if that
    /// connection was sent a call with this rid and it is still waiting: an answer from another
    /// device, hub or connection, or a late one, is ignored.
    pub fn method_response(&self, d: &HubDevice, session: u64, rid: &str, status: i32, body: &[u8]) {
        let key = PendingMethod::new(&d.hub, &d.device_id, session, rid);
        let Some(waiter) = self.methods.remove(&key) else {
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

    #[test]
    fn a_pending_call_is_named_by_hub_device_connection_and_rid() {
        let a = PendingMethod::new("Hub-A", "Dev-1", 7, "r");
        assert_eq!(a, PendingMethod::new("hub-a", "Dev-1", 7, "r"), "host names are case-insensitive");
        for other in [
            PendingMethod::new("hub-a", "dev-1", 7, "r"),
            PendingMethod::new("hub-b", "Dev-1", 7, "r"),
            PendingMethod::new("hub-a", "Dev-2", 7, "r"),
            PendingMethod::new("hub-a", "Dev-1", 8, "r"),
            PendingMethod::new("hub-a", "Dev-1", 7, "R"),
        ] {
            assert_ne!(a, other);
        }
    }
}
