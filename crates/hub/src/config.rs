//! [`HubConfig`]: the hub's limits and defaults.

use std::time::Duration;

use fleetgate_core::throttle::Rate;

/// Azure's limits and defaults that a deployment may tune.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Largest device-to-cloud message (body plus properties): 256 KB in Azure.
    pub max_message_bytes: usize,
    /// Largest cloud-to-device message: 64 KB.
    pub max_c2d_bytes: usize,
    /// Pending cloud-to-device messages per device: 50.
    pub c2d_queue_depth: usize,
    /// Default and maximum cloud-to-device time to live: 1 hour and 2 days.
    pub c2d_default_ttl: Duration,
    pub c2d_max_ttl: Duration,
    /// How long a message received over HTTPS stays locked to its receiver: 1 minute, fixed in
    /// Azure. A lock that lapses makes the message available again.
    pub c2d_lock: Duration,
    /// Deliveries (locks) of one message before it is dead-lettered: 10 by default in Azure.
    pub c2d_max_delivery_count: u32,
    /// Feedback records: kept 1 hour, locked 1 minute per receive, at most 10 deliveries
    /// (Azure's `feedback` defaults).
    pub feedback_ttl: Duration,
    pub feedback_lock: Duration,
    pub feedback_max_delivery_count: u32,
    /// Largest direct method payload: 128 KB.
    pub max_method_payload_bytes: usize,
    /// Device connects admitted per hub; over it, CONNACK 3 (server unavailable: the SDKs retry).
    pub connect_rate: Option<Rate>,
    /// Device-to-cloud messages per hub; over it, acknowledgements are delayed (traffic shaping,
    /// as IoT Hub does) rather than refused.
    pub message_rate: Option<Rate>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_c2d_bytes: 64 * 1024,
            c2d_queue_depth: 50,
            c2d_default_ttl: Duration::from_secs(3600),
            c2d_max_ttl: Duration::from_secs(2 * 24 * 3600),
            c2d_lock: Duration::from_secs(60),
            c2d_max_delivery_count: 10,
            feedback_ttl: Duration::from_secs(3600),
            feedback_lock: Duration::from_secs(60),
            feedback_max_delivery_count: 10,
            max_method_payload_bytes: 128 * 1024,
            connect_rate: None,
            message_rate: None,
        }
    }
}
