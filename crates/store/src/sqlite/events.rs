//! [`EventStream`] on the event log beside the registry.

use async_trait::async_trait;
use fleetgate_core::message::{ReceivedEvent, TelemetryEvent};

use super::{backend, SqliteStore};
use crate::event_log::EventLogError;
use crate::{EventPage, EventStream, StoreError, StoreResult};

#[async_trait]
impl EventStream for SqliteStore {
    async fn append_events(&self, events: Vec<ReceivedEvent>) -> StoreResult<Vec<u64>> {
        self.with_event_log(move |log| {
            log.append(&events).map_err(|e| match e {
                EventLogError::NoSpace(why) => StoreError::Unavailable(why),
                e => backend(e),
            })
        })
        .await
    }
    async fn events(&self, hub: &str, from: u64, limit: usize) -> StoreResult<EventPage> {
        let hub = hub.to_owned();
        self.with_event_log(move |log| {
            let page = log.read(&hub, from, limit).map_err(backend)?;
            let events = page
                .events
                .into_iter()
                .map(|(seq, e)| TelemetryEvent::from_received(seq, &hub, e).map_err(backend))
                .collect::<StoreResult<_>>()?;
            Ok(EventPage { events, next: page.next })
        })
        .await
    }
    async fn last_event_seq(&self) -> StoreResult<u64> {
        self.with_event_log(|log| Ok(log.last_seq())).await
    }
}
