//! Prometheus metrics (`GET /metrics`), through the Prometheus project's own Rust client.
//!
//! One process-wide set, so that any layer can count what it does without threading a handle
//! through every constructor; the names follow Prometheus conventions.
#![forbid(unsafe_code)]

pub mod log_limit;

use std::sync::LazyLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    /// Registrations by outcome: assigned, assigning, failed, disabled, unauthorized, throttled, error.
    pub registrations: Family<Labels, Counter>,
    /// Time to decide a registration (authenticated request to answer).
    pub registration_seconds: Histogram,
    /// Open connections by listener (mqtt, https) — includes ones still in the handshake.
    pub connections: Family<Labels, Gauge>,
    /// Devices with a live hub session.
    pub hub_sessions: Gauge,
    /// Device-to-cloud messages durably appended.
    pub messages: Counter,
    /// Requests slowed or refused by a quota: registration, connect, message, auth_failures (a
    /// source turned away after too many refused authentications).
    pub throttled: Family<Labels, Counter>,
    /// Damaged ranges found in the telemetry log (bytes that are not whole records, with whole
    /// records after them), each counted once per process.
    pub event_log_damaged_ranges: Counter,
    /// Bytes in those ranges.
    pub event_log_damaged_bytes: Counter,
    /// Telemetry log segments deleted, by reason: age (past the retention), size (over the cap).
    pub event_log_dropped_segments: Family<Labels, Counter>,
    /// Bytes the telemetry log holds on disk now.
    pub event_log_bytes: Gauge,
    /// Writes refused because the data directory's filesystem is below its free-space reserve,
    /// by what was refused: telemetry, registry.
    pub disk_reserve_refusals: Family<Labels, Counter>,
    /// Refused authentications (every one, including those only counted in the audit trail).
    pub auth_refusals: Counter,
    registry: Registry,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registrations = Family::<Labels, Counter>::default();
    let registration_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
    let connections = Family::<Labels, Gauge>::default();
    let hub_sessions = Gauge::default();
    let messages = Counter::default();
    let throttled = Family::<Labels, Counter>::default();
    let event_log_damaged_ranges = Counter::default();
    let event_log_damaged_bytes = Counter::default();
    let event_log_dropped_segments = Family::<Labels, Counter>::default();
    let event_log_bytes = Gauge::default();
    let disk_reserve_refusals = Family::<Labels, Counter>::default();
    let auth_refusals = Counter::default();
    let mut registry = Registry::with_prefix("fleetgate");
    registry.register("registrations", "Device registrations by outcome", registrations.clone());
    registry.register("registration_seconds", "Time to decide a registration", registration_seconds.clone());
    registry.register("connections", "Open connections by listener", connections.clone());
    registry.register("hub_sessions", "Devices connected to a hub", hub_sessions.clone());
    registry.register("messages", "Device-to-cloud messages durably appended", messages.clone());
    registry.register("throttled", "Requests slowed or refused by a quota", throttled.clone());
    registry.register(
        "event_log_damaged_ranges",
        "Damaged ranges found in the telemetry log (skipped, never truncated)",
        event_log_damaged_ranges.clone(),
    );
    registry.register(
        "event_log_damaged_bytes",
        "Bytes of damaged ranges found in the telemetry log",
        event_log_damaged_bytes.clone(),
    );
    registry.register(
        "event_log_dropped_segments",
        "Telemetry log segments deleted, by reason (age, size)",
        event_log_dropped_segments.clone(),
    );
    registry.register("event_log_bytes", "Bytes the telemetry log holds on disk", event_log_bytes.clone());
    registry.register(
        "disk_reserve_refusals",
        "Writes refused because free disk space is below the reserve, by kind (telemetry, registry)",
        disk_reserve_refusals.clone(),
    );
    registry.register("auth_refusals", "Refused authentications", auth_refusals.clone());
    Metrics {
        registrations,
        registration_seconds,
        connections,
        hub_sessions,
        messages,
        throttled,
        event_log_damaged_ranges,
        event_log_damaged_bytes,
        event_log_dropped_segments,
        event_log_bytes,
        disk_reserve_refusals,
        auth_refusals,
        registry,
    }
});

impl Metrics {
    pub fn registration(&self, outcome: &str) {
        self.registrations.get_or_create(&vec![("outcome", outcome.to_owned())]).inc();
    }

    pub fn throttle(&self, kind: &str) {
        self.throttled.get_or_create(&vec![("kind", kind.to_owned())]).inc();
    }

    pub fn segment_dropped(&self, reason: &str) {
        self.event_log_dropped_segments.get_or_create(&vec![("reason", reason.to_owned())]).inc();
    }

    pub fn disk_reserve_refusal(&self, kind: &str) {
        self.disk_reserve_refusals.get_or_create(&vec![("kind", kind.to_owned())]).inc();
    }

    pub fn auth_refused(&self) {
        self.auth_refusals.inc();
    }

    /// Counts a connection open until the guard drops.
    pub fn connection(&'static self, listener: &'static str) -> ConnectionGuard {
        let g = self.connections.get_or_create(&vec![("listener", listener.to_owned())]).clone();
        g.inc();
        ConnectionGuard(g)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        METRICS.registration("assigned");
        METRICS.throttle("connect");
        {
            let _c = METRICS.connection("mqtt");
            assert!(METRICS.render().contains("fleetgate_connections{listener=\"mqtt\"} 1"));
        }
        let text = METRICS.render();
        assert!(text.contains("fleetgate_registrations_total{outcome=\"assigned\"}"), "{text}");
        assert!(text.contains("fleetgate_throttled_total{kind=\"connect\"}"));
        assert!(text.contains("fleetgate_connections{listener=\"mqtt\"} 0"));
        assert!(text.contains("# EOF"));
    }

    #[test]
    fn renders_the_storage_metrics() {
        METRICS.segment_dropped("size");
        METRICS.disk_reserve_refusal("telemetry");
        METRICS.event_log_damaged_ranges.inc();
        let text = METRICS.render();
        for name in [
            "fleetgate_event_log_dropped_segments_total{reason=\"size\"}",
            "fleetgate_disk_reserve_refusals_total{kind=\"telemetry\"}",
            "fleetgate_event_log_damaged_ranges_total",
            "fleetgate_event_log_damaged_bytes_total",
            "fleetgate_event_log_bytes",
        ] {
            assert!(text.contains(name), "{name}: {text}");
        }
    }
}
