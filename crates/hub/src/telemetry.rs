//! Durable telemetry with group commit: many devices' messages, one append and one fdatasync.
//!
//! Sessions hand each message to a single writer task and wait for its position; the writer
//! takes everything queued (up to a batch), appends it to the event log with one write and one
//! `fdatasync` (see `store::event_log`), then answers every waiter. A device's PUBACK is sent only
//! after that answer, so nothing acknowledged can be lost. Readers (monitor-events) are woken through a broadcast and read from the store by
//! position, so a slow reader never loses events and never slows the writers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_core::message::{check_bag, ReceivedEvent};
use fleetgate_core::time::Timestamp;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_store::{EventPage, Store, StoreError};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::authentication::HubDevice;
use crate::errors::store_err;
use crate::Hub;

const MAX_BATCH: usize = 512;
const QUEUE: usize = 8192;

type Waiter = oneshot::Sender<Result<u64, AzureError>>;

/// How long a failed append keeps the writer unhealthy when nothing has succeeded since: long
/// enough for readiness probes to see it, short enough that an instance nobody sends to (while
/// unready) is tried again.
const FAILURE_SHOWS_FOR: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct EventWriter {
    tx: mpsc::Sender<(ReceivedEvent, Waiter)>,
    appended: broadcast::Sender<u64>,
    health: Arc<Health>,
}

/// When the last append succeeded and failed, in milliseconds since the writer started plus one
/// (0: never).
struct Health {
    started: Instant,
    last_success: AtomicU64,
    last_failure: AtomicU64,
}

impl Health {
    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
    }

    fn healthy(&self) -> bool {
        let (ok, failed) = (self.last_success.load(Ordering::Relaxed), self.last_failure.load(Ordering::Relaxed));
        let recent = u128::from(self.now().saturating_sub(failed)) < FAILURE_SHOWS_FOR.as_millis();
        !(failed > ok && recent)
    }
}

impl EventWriter {
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (appended, _) = broadcast::channel(1024);
        let health = Arc::new(Health {
            started: Instant::now(),
            last_success: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
        });
        tokio::spawn(write_loop(store, rx, appended.clone(), health.clone()));
        Self { tx, appended, health }
    }

    /// `false` while the last append failed (and not long ago): telemetry cannot be taken.
    pub fn healthy(&self) -> bool {
        self.health.healthy()
    }

    /// Appends one event; resolves with its position once it is on disk.
    pub async fn append(&self, event: ReceivedEvent) -> Result<u64, AzureError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((event, tx)).await.map_err(|_| AzureError::internal())?;
        rx.await.map_err(|_| AzureError::internal())?
    }

    /// Wakes with the last appended position after each batch.
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.appended.subscribe()
    }
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<(ReceivedEvent, Waiter)>,
    appended: broadcast::Sender<u64>,
    health: Arc<Health>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let (events, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        match store.append_events(events).await {
            Ok(seqs) => {
                health.last_success.store(health.now(), Ordering::Relaxed);
                let last = seqs.last().copied();
                for (w, seq) in waiters.into_iter().zip(seqs) {
                    let _ = w.send(Ok(seq));
                }
                if let Some(last) = last {
                    let _ = appended.send(last);
                }
            }
            Err(e) => {
                health.last_failure.store(health.now(), Ordering::Relaxed);
                let err = match e {
                    StoreError::Rejected(d) => d,
                    StoreError::Backend(msg) => {
                        tracing::error!(error = %msg, "telemetry append failed; devices get no PUBACK");
                        AzureError::internal()
                    }
                    // Logged (once per change of state) by the store.
                    StoreError::Unavailable(_) => AzureError::unavailable(),
                };
                for w in waiters {
                    let _ = w.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Device-to-cloud messages as the hub takes them, and the stream they are read from.
impl Hub {
    /// Validates and durably appends one telemetry message; resolves once it is on disk.
    pub async fn ingest(&self, d: &HubDevice, bag: &str, body: bytes::Bytes) -> Result<u64, AzureError> {
        if body.len() + bag.len() > self.config.max_message_bytes {
            return Err(AzureError::new(ErrorCode::MessageTooLarge, "The message is larger than 256 KB."));
        }
        check_bag(bag).map_err(|e| AzureError::bad_request(e.to_string()))?;
        self.admit_message(&d.hub).await;
        let now = Timestamp::now();
        d.touch(now);
        let event = ReceivedEvent {
            hub: d.hub.clone(),
            device_id: d.device_id.clone(),
            enqueued_time: now,
            bag: bag.to_owned(),
            connection: Some(d.connection.clone()),
            body: body.to_vec(),
        };
        let seq = self.events.append(event).await?;
        fleetgate_metrics::METRICS.messages.inc();
        Ok(seq)
    }

    pub fn event_notifications(&self) -> tokio::sync::broadcast::Receiver<u64> {
        self.events.subscribe()
    }

    /// A hub's events from position `from`; the page says where to continue.
    pub async fn events(&self, hub: &str, from: u64, limit: usize) -> Result<EventPage, AzureError> {
        self.store.events(hub, from, limit).await.map_err(store_err)
    }

    /// Position of the newest event in the stream (any hub; 0 when there is none).
    pub async fn last_event_seq(&self) -> Result<u64, AzureError> {
        self.store.last_event_seq().await.map_err(store_err)
    }
}
