//! Server configuration: what `fleetgate serve` takes from flags and the environment.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: IpAddr,
    pub mqtt_port: u16,
    pub https_port: u16,
    /// Names (DNS or IP) the server certificate covers; the first is the global device endpoint
    /// and the service API host name.
    pub hostnames: Vec<String>,
    /// Host name of the hub created on first start (`None`: the first of `hostnames`, the name
    /// the certificate is issued for first). On a later start a name that is not one of the
    /// instance's hubs stops the start: hubs are not renamed, as devices were told the name.
    pub hub_hostname: Option<String>,
    /// Answer register requests at once with the final result (true) or with 202 + polling.
    pub immediate_assignment: bool,
    pub limits: Limits,
    /// Hub limits (message sizes, C2D queue depth and TTL).
    pub hub: fleetgate_hub::HubConfig,
    /// How long a custom allocation webhook may take.
    pub webhook_timeout: Duration,
    /// The ID scope's registration quota (`None`: unlimited).
    pub registration_rate: Option<fleetgate_core::throttle::Rate>,
    /// An operator-supplied server certificate chain and key (PEM) instead of the generated one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for a replacement.
    pub cert_check_interval: Duration,
    /// How long device-to-cloud messages are kept in the event stream.
    pub event_retention: Duration,
    /// The most bytes the event stream keeps (oldest segments dropped first); `None`: derived
    /// from the free space at start (`fleetgate_store::disk::default_event_cap`).
    pub event_retention_bytes: Option<u64>,
    /// Free space kept on the data directory's filesystem: telemetry is refused below it,
    /// registry changes below half of it (retryably); `None`: derived from the filesystem's size
    /// (`fleetgate_store::disk::default_reserve`); `Some(0)`: no reserve.
    pub disk_reserve_bytes: Option<u64>,

    // Audit trail, refused authentications, readiness and metrics (issue 12, storage faults).
    /// The audit trail's retention and row cap, and how refused authentications are counted
    /// and limited per source address.
    pub audit: fleetgate_store::AuditOptions,
    /// A plain-HTTP listener that serves `/metrics` without credentials, for a Prometheus on a
    /// private network. `/metrics` on the HTTPS port always needs a DPS policy's token.
    pub metrics_listen: Option<SocketAddr>,
    /// Tests: makes the store fail on demand (the server then runs on a [`FaultyStore`]).
    ///
    /// [`FaultyStore`]: fleetgate_store::FaultyStore
    pub faults: Option<fleetgate_store::Faults>,
}

impl ServerConfig {
    /// The name of the hub created on first start.
    pub fn hub_name(&self) -> String {
        self.hub_hostname.clone().or_else(|| self.hostnames.first().cloned()).unwrap_or_else(|| "localhost".into())
    }

    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mqtt_port: 8883,
            https_port: 443,
            hostnames: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            hub_hostname: None,
            immediate_assignment: true,
            limits: Limits::default(),
            hub: fleetgate_hub::HubConfig::default(),
            webhook_timeout: Duration::from_secs(10),
            registration_rate: None,
            tls_cert: None,
            tls_key: None,
            cert_check_interval: Duration::from_secs(5),
            event_retention: Duration::from_secs(24 * 3600),
            event_retention_bytes: None,
            disk_reserve_bytes: None,
            audit: fleetgate_store::AuditOptions::default(),
            metrics_listen: None,
            faults: None,
        }
    }
}

/// Protective limits: every untrusted input is bounded in size and time.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent connections, both listeners together (file descriptors are per process); more
    /// wait in the accept backlog. At start it is lowered to what the file-descriptor limit
    /// allows (see [`crate::fd_limit`]).
    pub max_connections: usize,
    /// Concurrent connections from one source address (an IPv6 /64 counts as one address, as an
    /// attacker holds a whole prefix); 0 = no cap. Loopback clients are not capped: they are on
    /// this host, and a local TCP proxy makes every device look like one.
    pub max_connections_per_source: usize,
    /// Apply `max_connections_per_source` to loopback clients too.
    pub cap_loopback_sources: bool,
    /// Time allowed for the TLS handshake plus the MQTT CONNECT (slowloris guard).
    pub handshake_timeout: Duration,
    /// Largest MQTT packet accepted (DPS messages are at most 96 KB in Azure).
    pub max_dps_packet_bytes: usize,
    /// Idle limit for an MQTT client that asked for keep-alive 0.
    pub idle_timeout: Duration,
    /// Requests refused for their credentials (401) after which a DPS session is closed (one
    /// whose CONNECT credentials were refused is closed sooner: see `unauthenticated_timeout`);
    /// other refusals, such as 429 to a throttled device, do not count.
    pub max_failed_requests: u32,
    /// How long a DPS MQTT session whose credentials were refused stays open after CONNACK, to
    /// carry the 401 answer the SDKs report; a short grace after that answer has been sent ends
    /// it sooner.
    pub unauthenticated_timeout: Duration,
    /// Time allowed for reading one HTTP request's headers, counted from the end of the TLS
    /// handshake or of the previous response: it is also the keep-alive idle limit.
    pub http_header_timeout: Duration,
    /// Time allowed for reading one HTTP request's body, however it trickles in.
    pub http_body_timeout: Duration,
    /// Time a write may wait for the peer to take data (a peer that stops reading is cut off).
    pub write_timeout: Duration,
    /// Bytes all MQTT connections together may hold in packets that have not fully arrived.
    pub partial_packet_budget_bytes: usize,
    /// Time allowed for a large MQTT packet (more than a few KiB) to arrive once it has begun.
    pub partial_packet_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_connections_per_source: 1_000,
            cap_loopback_sources: false,
            handshake_timeout: Duration::from_secs(10),
            max_dps_packet_bytes: 96 * 1024,
            idle_timeout: Duration::from_secs(300),
            max_failed_requests: 5,
            unauthenticated_timeout: Duration::from_secs(10),
            http_header_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            partial_packet_budget_bytes: 64 * 1024 * 1024,
            partial_packet_timeout: Duration::from_secs(60),
        }
    }
}
