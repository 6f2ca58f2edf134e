//! The Rust device client: DPS registration and the hub's device-facing MQTT, speaking the wire
//! protocol exactly as Azure's Python SDK does (MQTT 3.1.1 over TLS, SAS tokens without `skn`).
//!
//! - [`provisioning`]: register a device with a symmetric (derived) key and get its hub.
//! - [`hub`]: connect to the assigned hub, send telemetry (QoS 1, resolved on PUBACK), receive
//!   cloud-to-device messages.
//!
//! Keys and tokens are never logged; [`fleetgate_core::keys::SymmetricKey`]'s `Debug` is redacted.

pub mod hub;
pub mod provisioning;
mod tls;

use std::time::Duration;

use rumqttc::{Event, EventLoop, MqttOptions, Outgoing, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use hub::{C2dMessage, HubClient, HubOptions};
pub use provisioning::{register, RegisterOptions, RegistrationResult};

pub use crate::dps_types::RegistrationState;

/// The `ClientVersion` / `DeviceClientType` this client announces.
pub const CLIENT_VERSION: &str = concat!("fleetgate-client/", env!("CARGO_PKG_VERSION"));
/// The port every SDK uses for MQTT over TLS.
pub const DEFAULT_MQTT_PORT: u16 = 8883;
/// Lifetime of the SAS tokens the client signs (what the Python SDK uses).
pub const TOKEN_TTL_SECS: i64 = 3600;

/// The former name of [`Error`](crate::Error), kept for existing code.
pub type DeviceError = crate::Error;

/// Where a device connects: the TCP address, and the name its certificate must carry.
pub(crate) struct Connection<'a> {
    pub host: &'a str,
    pub port: u16,
    pub server_name: Option<&'a str>,
    pub ca_pem: &'a [u8],
    pub client_id: &'a str,
    pub username: String,
    pub password: String,
    pub clean_session: bool,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
    pub timeout: Duration,
}

impl Connection<'_> {
    /// MQTT options and an event loop that will connect on its first poll.
    pub fn event_loop(self) -> Result<(rumqttc::AsyncClient, EventLoop), DeviceError> {
        if self.host.is_empty() {
            return Err(crate::Error::Config("no host to connect to".into()));
        }
        let tls = tls::client_config(self.ca_pem, self.host, self.server_name)?;
        let mut o = MqttOptions::new(self.client_id, self.host, self.port);
        o.set_credentials(self.username, self.password)
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session)
            .set_max_packet_size(self.max_packet_bytes, self.max_packet_bytes)
            .set_request_channel_capacity(64)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
        let mut net = el.network_options();
        net.set_connection_timeout(self.timeout.as_secs().max(1));
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        Ok((client, el))
    }
}

/// Polls an event loop on its own task (so waiting for events is cancel-safe) and forwards
/// every event; stops at the first error or after sending DISCONNECT. Dropping it closes the
/// connection.
pub(crate) struct Pump {
    pub rx: mpsc::UnboundedReceiver<Result<Event, DeviceError>>,
    task: JoinHandle<()>,
}

impl Pump {
    pub fn spawn(mut el: EventLoop) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let last = matches!(ev, Err(_) | Ok(Event::Outgoing(Outgoing::Disconnect)));
                if tx.send(ev.map_err(DeviceError::from)).is_err() || last {
                    break;
                }
            }
        });
        Self { rx, task }
    }

    /// The next event; `Disconnected` once the loop has stopped.
    pub async fn next(&mut self) -> Result<Event, DeviceError> {
        self.rx.recv().await.unwrap_or(Err(DeviceError::Disconnected))
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Percent-encodes like Python's `quote(s, safe="")`.
pub(crate) fn pct(s: &str) -> String {
    fleetgate_core::message::encode_component(s)
}
