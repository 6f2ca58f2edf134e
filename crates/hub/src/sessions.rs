//! Connected devices: one live session per device, reachable by the service side.
//!
//! Azure allows one connection per device id; a new CONNECT closes the old one. The map holds a
//! bounded sender to each session task plus what the device subscribed to, so the service API
//! can tell "not online" from "online but not listening".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;

/// What the hub asks a device's session to send.
#[derive(Debug)]
pub enum Outbound {
    /// A desired-properties patch; the body already carries `$version`.
    DesiredPatch { body: Value, version: u64 },
    /// A direct method call, answered through [`crate::Hub::method_response`].
    Method { rid: String, name: String, payload: Value },
    /// New cloud-to-device messages are queued for this device.
    CloudToDevice,
    /// Another connection for the same device took over.
    Close,
}

/// What the device subscribed to, readable without asking the session task.
#[derive(Debug, Default)]
pub struct SessionFlags {
    pub methods: AtomicBool,
    pub desired: AtomicBool,
    pub c2d: AtomicBool,
}

struct Entry {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    flags: Arc<SessionFlags>,
    connected_since: String,
}

/// Capacity of a session's outbound queue; a device that cannot keep up gets its calls refused
/// rather than growing memory without bound.
const OUTBOUND_QUEUE: usize = 64;

#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    map: Mutex<HashMap<(String, String), Entry>>,
}

pub struct SessionHandle {
    pub id: u64,
    pub rx: mpsc::Receiver<Outbound>,
    pub flags: Arc<SessionFlags>,
}

fn key(hub: &str, device: &str) -> (String, String) {
    (hub.to_ascii_lowercase(), device.to_ascii_lowercase())
}

impl Sessions {
    /// Registers a new session for a device, closing the previous one if any.
    pub fn register(&self, hub: &str, device: &str, now: String) -> SessionHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let flags = Arc::new(SessionFlags::default());
        let old = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key(hub, device), Entry { id, tx, flags: flags.clone(), connected_since: now });
        if let Some(old) = old {
            tracing::info!(device = %device, "new connection for the device; closing the old one");
            let _ = old.tx.try_send(Outbound::Close);
        }
        SessionHandle { id, rx, flags }
    }

    /// Removes the session if it is still the registered one.
    pub fn unregister(&self, hub: &str, device: &str, id: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key(hub, device)).is_some_and(|e| e.id == id) {
            map.remove(&key(hub, device));
        }
    }

    /// The session's sender and flags, if the device is connected.
    pub fn get(&self, hub: &str, device: &str) -> Option<(mpsc::Sender<Outbound>, Arc<SessionFlags>)> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key(hub, device))
            .map(|e| (e.tx.clone(), e.flags.clone()))
    }

    /// When the device's current connection started, if connected.
    pub fn connected_since(&self, hub: &str, device: &str) -> Option<String> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&key(hub, device)).map(|e| e.connected_since.clone())
    }

    pub fn count(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
