//! Connected devices: one live session per device, reachable by the service side.
//!
//! Azure allows one connection per device id; a new CONNECT closes the old one. The map holds a
//! bounded sender to each session task plus what the device subscribed to, so the service API
//! can tell "not online" from "online but not listening".

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::Notify;

/// What the hub asks a device's session to send. Large variants are boxed: tokio allocates a
/// session's queue 32 slots at a time up front, so the slot size is paid by every connection.
#[derive(Debug)]
pub enum Outbound {
    /// A desired-properties patch; the body already carries `$version`.
    DesiredPatch(Box<DesiredPatch>),
    /// A direct method call, answered through [`crate::Hub::method_response`].
    Method(Box<MethodCall>),
    /// New cloud-to-device messages are queued for this device.
    CloudToDevice,
    /// The session must end: another connection for the device took over, or the device was
    /// disabled, deleted or given new credentials.
    Close,
}

#[derive(Debug)]
pub struct DesiredPatch {
    pub body: Value,
    pub version: u64,
}

#[derive(Debug)]
pub struct MethodCall {
    pub rid: String,
    pub name: String,
    pub payload: Value,
}

/// What the device subscribed to, readable without asking the session task.
#[derive(Debug, Default)]
pub struct SessionFlags {
    pub methods: AtomicBool,
    pub desired: AtomicBool,
    pub c2d: AtomicBool,
}

/// A session's queue of [`Outbound`] requests, bounded. A mutex-guarded deque and a `Notify`
/// rather than a tokio channel, which allocates about 1 KB per session up front (a 32-slot block
/// and cache-padded state): an idle connection should cost little.
#[derive(Default)]
pub struct Inbox {
    queue: Mutex<VecDeque<Outbound>>,
    ready: Notify,
    /// Set by [`Inbox::close`]: outside the bounded queue, so a session whose queue is full is
    /// still told to close.
    closing: AtomicBool,
}

impl Inbox {
    /// Queues a request; gives it back when the session already has [`OUTBOUND_QUEUE`] waiting.
    pub fn try_send(&self, out: Outbound) -> Result<(), Outbound> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= OUTBOUND_QUEUE {
            return Err(out);
        }
        queue.push_back(out);
        drop(queue);
        // Stores a permit if the session is not waiting: its next `recv` returns at once.
        self.ready.notify_one();
        Ok(())
    }

    /// Tells the session to close, ahead of anything queued and even when the queue is full.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// The next request (for the session task, the only receiver); [`Outbound::Close`] first
    /// once the session was told to close.
    pub async fn recv(&self) -> Outbound {
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Outbound::Close;
            }
            if let Some(out) = self.pop() {
                return out;
            }
            self.ready.notified().await;
        }
    }

    fn pop(&self) -> Option<Outbound> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let out = queue.pop_front();
        // Queue memory is given back once drained, so an idle session holds none.
        if queue.is_empty() {
            queue.shrink_to_fit();
        }
        out
    }
}

struct Entry {
    id: u64,
    tx: Arc<Inbox>,
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

/// A connected device's session as the service side reaches it. `id` names the connection:
/// an answer to a request sent through `tx` counts only when it comes back on that connection.
pub struct Live {
    pub id: u64,
    pub tx: Arc<Inbox>,
    pub flags: Arc<SessionFlags>,
}

pub struct SessionHandle {
    pub id: u64,
    pub rx: Arc<Inbox>,
    pub flags: Arc<SessionFlags>,
}

fn key(hub: &str, device: &str) -> (String, String) {
    (hub.to_ascii_lowercase(), device.to_ascii_lowercase())
}

impl Sessions {
    /// Registers a new session for a device, closing the previous one if any.
    pub fn register(&self, hub: &str, device: &str, now: String) -> SessionHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let tx = Arc::new(Inbox::default());
        let rx = tx.clone();
        let flags = Arc::new(SessionFlags::default());
        let old = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key(hub, device), Entry { id, tx, flags: flags.clone(), connected_since: now });
        if let Some(old) = old {
            tracing::info!(device = %device, "new connection for the device; closing the old one");
            old.tx.close();
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

    /// The device's current session, if it is connected.
    pub fn get(&self, hub: &str, device: &str) -> Option<Live> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&key(hub, device)).map(|e| Live {
            id: e.id,
            tx: e.tx.clone(),
            flags: e.flags.clone(),
        })
    }

    /// Asks the device's current session, if any, to close (the device was disabled, deleted or
    /// its credentials changed).
    pub fn close(&self, hub: &str, device: &str) {
        if let Some(live) = self.get(hub, device) {
            live.tx.close();
        }
    }

    /// When the device's current connection started, if connected.
    pub fn connected_since(&self, hub: &str, device: &str) -> Option<String> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&key(hub, device)).map(|e| e.connected_since.clone())
    }

    pub fn count(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inbox_is_bounded_ordered_and_wakes_its_session() {
        let inbox = Arc::new(Inbox::default());
        for _ in 0..OUTBOUND_QUEUE {
            inbox.try_send(Outbound::CloudToDevice).unwrap();
        }
        assert!(matches!(inbox.try_send(Outbound::Close), Err(Outbound::Close)), "full");
        for _ in 0..OUTBOUND_QUEUE {
            assert!(matches!(inbox.recv().await, Outbound::CloudToDevice));
        }
        assert_eq!(inbox.queue.lock().unwrap().capacity(), 0, "drained queue memory is given back");
        // A session waiting on an empty inbox wakes for the next request.
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.recv().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        inbox.try_send(Outbound::Close).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert!(matches!(got, Outbound::Close));
    }

    #[tokio::test]
    async fn close_reaches_a_session_whose_queue_is_full() {
        let inbox = Inbox::default();
        while inbox.try_send(Outbound::CloudToDevice).is_ok() {}
        inbox.close();
        assert!(matches!(inbox.recv().await, Outbound::Close), "ahead of the queued requests");
    }
}
