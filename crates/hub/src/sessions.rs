//! Connected devices: one live session per device, reachable by the service side.
//!
//! Azure allows one connection per device id; a new CONNECT closes the old one. The map holds a
//! bounded sender to each session task plus what the device subscribed to, so the service API
//! can tell "not online" from "online but not listening".

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
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

/// Number of [`Sessions::closes`] counters.
const CLOSE_STRIPES: usize = 4096;

pub struct Sessions {
    next_id: AtomicU64,
    map: Mutex<HashMap<(String, String), Entry>>,
    /// Close requests per device, so that a connection authenticated before a change but
    /// registered after it is refused (see [`Sessions::register`]). Closing a device finds only
    /// a session already registered: without this, a disable, delete or credential change
    /// committed while a CONNECT was between reading the identity and registering its session
    /// would close nothing, and that connection would run on the old credentials until they
    /// expire. Counters are striped by a keyed hash of the device rather than kept per device:
    /// memory stays fixed (32 KB) however many devices are ever closed, and a collision only
    /// costs a device a retryable refusal when another device of its stripe was closed while it
    /// was connecting. Only bumped and compared under `map`'s lock.
    closes: Box<[AtomicU64]>,
    stripe_hasher: std::collections::hash_map::RandomState,
    /// When each device that is not connected last disconnected (Azure's
    /// `connectionStateUpdatedTime` of a disconnected device). One entry per device that has
    /// connected since the server started, as for last activity; it goes when it reconnects.
    disconnected_at: Mutex<HashMap<(String, String), String>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            next_id: AtomicU64::new(0),
            map: Mutex::default(),
            closes: (0..CLOSE_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            stripe_hasher: std::collections::hash_map::RandomState::new(),
            disconnected_at: Mutex::default(),
        }
    }
}

/// The close requests a device had when its connection started to authenticate: read (with
/// [`Sessions::closes_before_auth`]) before its identity is read from the store, handed back to
/// [`Sessions::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCount(u64);

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

/// How the hub's in-memory maps name a device: host names are case-insensitive (DNS), device
/// ids case-sensitive (as in IoT Hub: `Dev-1` and `dev-1` are two devices).
pub(crate) fn key(hub: &str, device: &str) -> (String, String) {
    (hub.to_ascii_lowercase(), device.to_owned())
}

impl Sessions {
    fn closes_of(&self, key: &(String, String)) -> &AtomicU64 {
        &self.closes[self.stripe_hasher.hash_one(key) as usize % CLOSE_STRIPES]
    }

    /// To be read before the device's identity is: see [`Sessions::register`].
    pub fn closes_before_auth(&self, hub: &str, device: &str) -> CloseCount {
        CloseCount(self.closes_of(&key(hub, device)).load(Ordering::Acquire))
    }

    /// Registers a new session for a device, closing the previous one if any; `None` when the
    /// device may have been closed since `authenticated` was read: its connection was
    /// authenticated on an identity that may have changed since, and must be refused.
    ///
    /// Why this closes the race: a change is committed before [`Sessions::close`] is called, and
    /// `authenticated` was read before the identity was. So if the authentication read the old
    /// identity, the close comes after that read; either it came before this registration (the
    /// count moved: refused here) or it comes after it (it finds and closes this session). Both
    /// the count's check and its bump are made under the map's lock, so there is no third order.
    pub fn register(&self, hub: &str, device: &str, authenticated: CloseCount, now: String) -> Option<SessionHandle> {
        let key = key(hub, device);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if self.closes_of(&key).load(Ordering::Acquire) != authenticated.0 {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let tx = Arc::new(Inbox::default());
        let rx = tx.clone();
        let flags = Arc::new(SessionFlags::default());
        self.disconnected_at.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        let old = map.insert(key, Entry { id, tx, flags: flags.clone(), connected_since: now });
        drop(map);
        if let Some(old) = old {
            tracing::info!(device = %device, "new connection for the device; closing the old one");
            old.tx.close();
        }
        Some(SessionHandle { id, rx, flags })
    }

    /// Removes the session if it is still the registered one (a session replaced by a newer
    /// connection leaves the device connected), noting `now` as when the device disconnected.
    pub fn unregister(&self, hub: &str, device: &str, id: u64, now: String) {
        let key = key(hub, device);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(|e| e.id == id) {
            map.remove(&key);
            // Under `map`'s lock, as in `register`: the two never interleave.
            self.disconnected_at.lock().unwrap_or_else(|p| p.into_inner()).insert(key, now);
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
    /// its credentials changed), and refuses the sessions of connections already authenticating
    /// (see [`Sessions::register`]). Called after the change is committed.
    pub fn close(&self, hub: &str, device: &str) {
        let key = key(hub, device);
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.closes_of(&key).fetch_add(1, Ordering::AcqRel);
        if let Some(e) = map.get(&key) {
            e.tx.close();
        }
    }

    /// Whether the device is connected, and since when it has been connected or disconnected
    /// (`None`: it has not connected since the server started).
    pub fn connection_state(&self, hub: &str, device: &str) -> (bool, Option<String>) {
        let key = key(hub, device);
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&key) {
            Some(e) => (true, Some(e.connected_since.clone())),
            None => (false, self.disconnected_at.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned()),
        }
    }

    /// How many devices of `hub` are connected now (service statistics).
    pub fn count_of(&self, hub: &str) -> usize {
        let hub = hub.to_ascii_lowercase();
        self.map.lock().unwrap_or_else(|p| p.into_inner()).keys().filter(|(h, _)| *h == hub).count()
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
        // On this single-threaded runtime, yielding runs the spawned task until it waits on
        // the empty inbox: the request below then wakes a waiting session, not a stored permit.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        inbox.try_send(Outbound::Close).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert!(matches!(got, Outbound::Close));
    }

    #[test]
    fn a_close_between_authentication_and_registration_refuses_the_session() {
        let sessions = Sessions::default();
        let authenticated = sessions.closes_before_auth("Hub", "dev");
        // Committed and closed while the connection was between its identity read and here:
        // there was no session to close yet.
        sessions.close("HUB", "dev");
        assert!(sessions.register("hub", "dev", authenticated, String::new()).is_none());
        assert_eq!(sessions.count(), 0);
        // A connection that authenticates after the change registers.
        let authenticated = sessions.closes_before_auth("hub", "dev");
        let handle = sessions.register("hub", "dev", authenticated, String::new()).expect("registered");
        assert_eq!(sessions.get("hub", "dev").map(|l| l.id), Some(handle.id));
        // A close after the registration closes the session (the other order).
        sessions.close("hub", "dev");
        assert!(handle.rx.closing.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn close_reaches_a_session_whose_queue_is_full() {
        let inbox = Inbox::default();
        while inbox.try_send(Outbound::CloudToDevice).is_ok() {}
        inbox.close();
        assert!(matches!(inbox.recv().await, Outbound::Close), "ahead of the queued requests");
    }
}
