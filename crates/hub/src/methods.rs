//! Direct methods: a service's call delivered to the device's connection, and the answer
//! accepted only from that connection.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_core::{AzureError, ErrorCode};
use serde_json::Value;
use tokio::sync::{oneshot, Notify};

use crate::authentication::HubDevice;
use crate::sessions::{Live, MethodCall, Outbound};
use crate::Hub;

type MethodWaiter = oneshot::Sender<Result<(i32, Value), AzureError>>;

/// Characters Azure forbids in a method name (besides anything outside printable US-ASCII,
/// which rules out space and tab): its direct methods guide lists them.
const FORBIDDEN_IN_METHOD_NAMES: &str = "$()<>@,;:\\\"/[]?={}";

/// Whether Azure accepts `name` as a method name: 1 to 256 printable US-ASCII characters, none
/// of [`FORBIDDEN_IN_METHOD_NAMES`].
fn method_name_ok(name: &str) -> bool {
    (1..=256).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_graphic() && !FORBIDDEN_IN_METHOD_NAMES.as_bytes().contains(&b))
}

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

/// Callers waiting for a device to connect and subscribe to methods (`connectTimeoutInSeconds`),
/// woken when it does: an entry per device waited for, gone with its last waiter.
#[derive(Default)]
pub(crate) struct MethodListeners(Mutex<HashMap<(String, String), Waiting>>);

/// What wakes the callers waiting for one device, and how many they are.
type Waiting = (Arc<Notify>, usize);

/// A caller's registration in [`MethodListeners`]; dropping it unregisters.
struct Listening<'a> {
    listeners: &'a MethodListeners,
    key: (String, String),
    notify: Arc<Notify>,
}

impl MethodListeners {
    fn listen(&self, hub: &str, device: &str) -> Listening<'_> {
        let key = crate::sessions::key(hub, device);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(key.clone()).or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Listening { listeners: self, key, notify: entry.0.clone() }
    }

    /// Wakes the callers waiting for this device, if any.
    pub(crate) fn wake(&self, hub: &str, device: &str) {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((notify, _)) = map.get(&crate::sessions::key(hub, device)) {
            notify.notify_waiters();
        }
    }
}

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        let mut map = self.listeners.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.key);
            }
        }
    }
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

fn offline() -> AzureError {
    AzureError::new(ErrorCode::DeviceNotOnline, "The device is not online or not listening for direct methods.")
}

impl Hub {
    /// Invokes a direct method and waits for the device's answer (status, payload). A device
    /// not connected and subscribed to methods is waited for up to `connect_timeout` (Azure's
    /// `connectTimeoutInSeconds`; zero: it must be already); `timeout` then counts from the call.
    pub async fn invoke_method(
        &self,
        hub: &str,
        device_id: &str,
        name: &str,
        payload: Value,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<(i32, Value), AzureError> {
        if !method_name_ok(name) {
            return Err(AzureError::bad_request(
                "methodName must be 1 to 256 printable US-ASCII characters, none of $ ( ) < > @ , ; : \\ \" / [ ] ? = { } (nor space or tab).",
            ));
        }
        if payload.to_string().len() > self.config.max_method_payload_bytes {
            return Err(AzureError::new(ErrorCode::MessageTooLarge, "The method payload is larger than 128 KB."));
        }
        self.twin(hub, device_id).await?;
        let live = self.listening_session(hub, device_id, connect_timeout).await?;
        let rid = new_method_rid();
        let pending = PendingMethod::new(hub, device_id, live.id, &rid);
        let (wtx, wrx) = oneshot::channel();
        self.methods.insert(pending.clone(), wtx);
        if live.tx.try_send(Outbound::Method(Box::new(MethodCall { rid, name: name.to_owned(), payload }))).is_err() {
            self.methods.remove(&pending);
            return Err(offline());
        }
        match tokio::time::timeout(timeout, wrx).await {
            Ok(Ok(answer)) => answer,
            _ => {
                self.methods.remove(&pending);
                Err(AzureError::new(ErrorCode::GatewayTimeout, "The device did not answer the direct method in time."))
            }
        }
    }

    /// The device's session once it is connected and subscribed to methods, waiting up to
    /// `wait` for it. Woken by [`Hub::listening_for_methods`], never by polling.
    async fn listening_session(&self, hub: &str, device_id: &str, wait: Duration) -> Result<Live, AzureError> {
        let ready = || self.sessions.get(hub, device_id).filter(|l| l.flags.methods.load(Ordering::Acquire));
        if wait.is_zero() {
            return ready().ok_or_else(offline);
        }
        let listening = self.method_listeners.listen(hub, device_id);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check: a subscription between the check and the wait still
            // wakes this caller.
            let notified = listening.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(live) = ready() {
                return Ok(live);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(offline());
            }
        }
    }

    /// The device's connection `d` now takes method calls (it subscribed, or a persistent
    /// session restored the subscription): callers waiting for it go ahead. Called after the
    /// session's flag is set.
    pub fn listening_for_methods(&self, d: &HubDevice) {
        self.method_listeners.wake(&d.hub, &d.device_id);
    }

    /// A device's answer to a method call, from its connection `session`. It counts only if that
    /// connection was sent a call with this rid and it is still waiting: an answer from another
    /// device, hub or connection, or a late one, is ignored. An answer larger than Azure's
    /// 128 KB fails the call (413) instead of reaching the caller.
    pub fn method_response(&self, d: &HubDevice, session: u64, rid: &str, status: i32, body: &[u8]) {
        let key = PendingMethod::new(&d.hub, &d.device_id, session, rid);
        let Some(waiter) = self.methods.remove(&key) else {
            tracing::info!(hub = %d.hub, device = %d.device_id, "method answer matches no call pending on this connection; ignored");
            return;
        };
        if body.len() > self.config.max_method_payload_bytes {
            tracing::info!(hub = %d.hub, device = %d.device_id, bytes = body.len(), "method answer larger than 128 KB; the call fails");
            let too_large = AzureError::new(
                ErrorCode::MessageTooLarge,
                "The device's method response payload is larger than 128 KB.",
            );
            let _ = waiter.send(Err(too_large));
            return;
        }
        let payload = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        let _ = waiter.send(Ok((status, payload)));
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

    /// Issue 14 item 11: the names Azure's direct methods guide allows.
    #[test]
    fn method_names_are_printable_ascii_without_azures_forbidden_characters() {
        for ok in ["reboot", "a", "get-Status_v2.1", "x*!#%&'+^`|~", &"m".repeat(256)] {
            assert!(method_name_ok(ok), "{ok}");
        }
        for c in ['$', '(', ')', '<', '>', '@', ',', ';', ':', '\\', '"', '/', '[', ']', '?', '=', '{', '}', ' ', '\t']
        {
            assert!(!method_name_ok(&format!("re{c}boot")), "{c:?}");
        }
        for bad in ["", "caf\u{e9}", "a\u{7f}", "a\nb", &"m".repeat(257)] {
            assert!(!method_name_ok(bad), "{bad:?}");
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
