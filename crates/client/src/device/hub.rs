//! A device's connection to its IoT hub over MQTT 3.1.1: telemetry and cloud-to-device messages.
//!
//! A background task owns the rumqttc event loop. QoS 1 publishes are matched to their PUBACKs
//! by order: requests reach the event loop in the order [`HubClient::send_telemetry`] queued them
//! (a lock keeps "queue a waiter, hand the request over" atomic), the loop reports each as
//! `Outgoing::Publish(pkid)` in that same order, and the waiter is then keyed by that packet id
//! until `PubAck(pkid)` arrives. Subscriptions are tracked the same way. The client does not
//! reconnect: when the connection drops, every waiter gets the error and later calls fail.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::message::{parse_bag, Properties, SYSTEM_PROPERTIES};
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{pct, Connection, DeviceError, CLIENT_VERSION, DEFAULT_MQTT_PORT, TOKEN_TTL_SECS};

/// The hub device API version announced in the username.
pub const API_VERSION: &str = "2021-04-12";
/// Largest telemetry message the hub accepts (256 KB), plus room for the topic.
const MAX_PACKET_BYTES: usize = 256 * 1024 + 16 * 1024;

/// How to reach the hub and who the device is.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Address to connect to (host name or IP).
    pub host: String,
    /// MQTT-over-TLS port (8883 by default).
    pub port: u16,
    /// Name the server certificate must carry; `None` means `host`.
    pub server_name: Option<String>,
    /// PEM of the CA to trust; nothing else is trusted.
    pub ca_pem: Vec<u8>,
    /// The hub's host name as the service knows it (DPS's `assignedHub`): used in the username
    /// and the SAS resource, not for connecting.
    pub hub_host_name: String,
    /// The device's id in the hub (DPS's `deviceId`).
    pub device_id: String,
    /// The device's key (for a group enrollment: the key derived for its registration id).
    pub device_key: SymmetricKey,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// Limit for connecting and for each acknowledgement (PUBACK, SUBACK).
    pub timeout: Duration,
}

impl HubOptions {
    /// Port 8883, server name = host, keep-alive 60 s, 30 s timeout.
    pub fn new(
        host: impl Into<String>,
        ca_pem: Vec<u8>,
        hub_host_name: impl Into<String>,
        device_id: impl Into<String>,
        device_key: SymmetricKey,
    ) -> Self {
        Self {
            host: host.into(),
            port: DEFAULT_MQTT_PORT,
            server_name: None,
            ca_pem,
            hub_host_name: hub_host_name.into(),
            device_id: device_id.into(),
            device_key,
            keep_alive: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A cloud-to-device message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2dMessage {
    /// The message body, as sent.
    pub body: Vec<u8>,
    /// System properties under their stream names (`message-id`, ...); system keys this client
    /// does not know keep their `$.` form. Application properties as sent.
    pub properties: Properties,
}

/// `{hub}/{deviceId}/?api-version=2021-04-12&DeviceClientType=fleetgate-client%2F0.1.0`
pub fn username(hub_host_name: &str, device_id: &str) -> String {
    format!("{hub_host_name}/{device_id}/?api-version={API_VERSION}&DeviceClientType={}", pct(CLIENT_VERSION))
}

/// The resource the device's SAS token is for.
pub fn sas_resource(hub_host_name: &str, device_id: &str) -> String {
    format!("{hub_host_name}/devices/{device_id}")
}

/// The MQTT password: SAS for [`sas_resource`] in Python's form (encoded `sr`, no `skn`).
pub fn password(key: &SymmetricKey, hub_host_name: &str, device_id: &str, expiry_unix_secs: i64) -> String {
    build_token(key, &sas_resource(hub_host_name, device_id), expiry_unix_secs, None)
}

/// `devices/{id}/messages/events/{bag}`.
pub fn telemetry_topic(device_id: &str, props: &Properties) -> String {
    format!("devices/{device_id}/messages/events/{}", props.to_bag())
}

/// The C2D subscription filter.
pub fn c2d_filter(device_id: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/#")
}

/// Decodes a C2D topic's property bag. Lenient where the telemetry parser is strict: a message
/// the hub sent is delivered even when it carries system properties this client does not know.
pub fn c2d_properties(bag: &str) -> Properties {
    let mut p = Properties::default();
    let pairs = match parse_bag(bag) {
        Ok(pairs) => pairs,
        Err(e) => {
            tracing::warn!(error = %e, "C2D message with an unreadable property bag; properties dropped");
            return p;
        }
    };
    for (k, v) in pairs {
        let v = v.unwrap_or_default();
        match k.strip_prefix("$.") {
            Some(short) => {
                let name = SYSTEM_PROPERTIES.iter().find(|(s, _)| *s == short).map(|(_, n)| (*n).to_owned());
                p.system.insert(name.unwrap_or(k), v);
            }
            None => {
                p.application.insert(k, v);
            }
        }
    }
    p
}

type Waiter<T> = oneshot::Sender<Result<T, DeviceError>>;

#[derive(Default)]
struct Shared {
    /// Publishes handed to the event loop that it has not yet given a packet id, in order.
    publishes: VecDeque<Waiter<()>>,
    /// Publishes sent, by packet id, waiting for their PUBACK.
    published: HashMap<u16, Waiter<()>>,
    subscribes: VecDeque<Waiter<Vec<SubscribeReasonCode>>>,
    subscribed: HashMap<u16, Waiter<Vec<SubscribeReasonCode>>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

fn closed_error(reason: &str) -> DeviceError {
    if reason == "disconnected" {
        DeviceError::Disconnected
    } else {
        DeviceError::transport(reason)
    }
}

impl Shared {
    fn close(&mut self, reason: String) {
        for w in self.publishes.drain(..).chain(self.published.drain().map(|(_, w)| w)) {
            let _ = w.send(Err(closed_error(&reason)));
        }
        for w in self.subscribes.drain(..).chain(self.subscribed.drain().map(|(_, w)| w)) {
            let _ = w.send(Err(closed_error(&reason)));
        }
        self.closed = Some(reason);
    }
}

/// A connected device.
pub struct HubClient {
    client: AsyncClient,
    device_id: String,
    shared: Arc<Mutex<Shared>>,
    /// Held while queueing a waiter and handing its request to the event loop.
    order: tokio::sync::Mutex<()>,
    c2d: Mutex<Option<mpsc::UnboundedReceiver<C2dMessage>>>,
    task: JoinHandle<()>,
    timeout: Duration,
}

impl HubClient {
    /// Connects (TLS, CONNECT with a fresh one-hour SAS token) and waits for the CONNACK.
    pub async fn connect(o: &HubOptions) -> Result<HubClient, DeviceError> {
        let expiry = Timestamp::now().unix_seconds() + TOKEN_TTL_SECS;
        let (client, mut el) = Connection {
            host: &o.host,
            port: o.port,
            server_name: o.server_name.as_deref(),
            ca_pem: &o.ca_pem,
            client_id: &o.device_id,
            username: username(&o.hub_host_name, &o.device_id),
            password: password(&o.device_key, &o.hub_host_name, &o.device_id, expiry),
            clean_session: false,
            keep_alive: o.keep_alive,
            max_packet_bytes: MAX_PACKET_BYTES,
            timeout: o.timeout,
        }
        .event_loop()?;
        let connected = tokio::time::timeout(o.timeout, async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(DeviceError::from(e)),
                }
            }
        })
        .await;
        match connected {
            Ok(r) => r?,
            Err(_) => return Err(DeviceError::Timeout),
        }
        tracing::debug!(device_id = %o.device_id, hub = %o.hub_host_name, "connected to the hub");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (c2d_tx, c2d_rx) = mpsc::unbounded_channel();
        let prefix = format!("devices/{}/messages/devicebound/", o.device_id);
        let task = tokio::spawn(drive(el, shared.clone(), c2d_tx, prefix));
        Ok(HubClient {
            client,
            device_id: o.device_id.clone(),
            shared,
            order: tokio::sync::Mutex::new(()),
            c2d: Mutex::new(Some(c2d_rx)),
            task,
            timeout: o.timeout,
        })
    }

    /// The id the device connected as.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Sends one telemetry message at QoS 1; resolves when the hub has acknowledged it (PUBACK).
    pub async fn send_telemetry(&self, body: Vec<u8>, props: &Properties) -> Result<(), DeviceError> {
        let topic = telemetry_topic(&self.device_id, props);
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.order.lock().await;
            self.queue(|s| s.publishes.push_back(tx))?;
            if let Err(e) = self.client.publish(topic, QoS::AtLeastOnce, false, body).await {
                // Never reached the event loop: take our waiter back (it is the last one queued).
                self.shared.lock().unwrap().publishes.pop_back();
                return Err(match e {
                    rumqttc::ClientError::Request(_) | rumqttc::ClientError::TryRequest(_) => {
                        self.closed_reason().map(|r| closed_error(&r)).unwrap_or(DeviceError::Disconnected)
                    }
                });
            }
        }
        self.wait(rx).await
    }

    /// Subscribes to cloud-to-device messages and returns them as they arrive. Messages the hub
    /// delivered before the subscription (a persistent session) are in the receiver too. Only
    /// one receiver exists; a second call fails.
    pub async fn subscribe_c2d(&self) -> Result<mpsc::UnboundedReceiver<C2dMessage>, DeviceError> {
        let rx = self
            .c2d
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| DeviceError::Config("already subscribed to C2D messages".into()))?;
        let (tx, ack) = oneshot::channel();
        let result = async {
            {
                let _order = self.order.lock().await;
                self.queue(|s| s.subscribes.push_back(tx))?;
                if self.client.subscribe(c2d_filter(&self.device_id), QoS::AtLeastOnce).await.is_err() {
                    self.shared.lock().unwrap().subscribes.pop_back();
                    return Err(DeviceError::Disconnected);
                }
            }
            let codes = self.wait(ack).await?;
            if codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                return Err(DeviceError::Protocol("the hub refused the C2D subscription".into()));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(rx),
            Err(e) => {
                *self.c2d.lock().unwrap() = Some(rx);
                Err(e)
            }
        }
    }

    /// Sends DISCONNECT and closes the connection. Unacknowledged messages fail with
    /// `Disconnected`.
    pub async fn disconnect(mut self) -> Result<(), DeviceError> {
        let sent = self.client.try_disconnect().is_ok();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
        self.shared.lock().unwrap().close("disconnected".into());
        if sent {
            Ok(())
        } else {
            Err(self.closed_reason().map(|r| closed_error(&r)).unwrap_or(DeviceError::Disconnected))
        }
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.closed_reason().is_none()
    }

    fn closed_reason(&self) -> Option<String> {
        self.shared.lock().unwrap().closed.clone()
    }

    fn queue(&self, f: impl FnOnce(&mut Shared)) -> Result<(), DeviceError> {
        let mut s = self.shared.lock().unwrap();
        if let Some(r) = &s.closed {
            return Err(closed_error(r));
        }
        f(&mut s);
        Ok(())
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, DeviceError>>) -> Result<T, DeviceError> {
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(DeviceError::Disconnected),
            Err(_) => Err(DeviceError::Timeout),
        }
    }
}

impl Drop for HubClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drive(
    mut el: EventLoop,
    shared: Arc<Mutex<Shared>>,
    c2d: mpsc::UnboundedSender<C2dMessage>,
    c2d_prefix: String,
) {
    loop {
        let ev = el.poll().await;
        let mut s = shared.lock().unwrap();
        match ev {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                if let Some(w) = s.publishes.pop_front() {
                    s.published.insert(pkid, w);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(w) = s.published.remove(&ack.pkid) {
                    let _ = w.send(Ok(()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                if let Some(w) = s.subscribes.pop_front() {
                    s.subscribed.insert(pkid, w);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if let Some(w) = s.subscribed.remove(&ack.pkid) {
                    let _ = w.send(Ok(ack.return_codes));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match p.topic.strip_prefix(&c2d_prefix) {
                // rumqttc sends the PUBACK itself.
                Some(bag) => {
                    let _ = c2d.send(C2dMessage { body: p.payload.to_vec(), properties: c2d_properties(bag) });
                }
                None => tracing::debug!(topic = %p.topic, "ignoring a publish on an unexpected topic"),
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                s.close("disconnected".into());
                return;
            }
            Err(e) => {
                let reason = DeviceError::from(e).to_string();
                tracing::debug!(error = %reason, "hub connection ended");
                s.close(reason);
                return;
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_password_and_topics() {
        assert_eq!(
            username("myhub.azure-devices.net", "dev-001"),
            format!(
                "myhub.azure-devices.net/dev-001/?api-version=2021-04-12&DeviceClientType=fleetgate-client%2F{}",
                env!("CARGO_PKG_VERSION")
            )
        );
        // Vector A5 of wire-examples.md (the Python SDK's hub token).
        let key = SymmetricKey::from_base64("SV+2SImDP9Vx9XL3ACWx9N9ZFlb6ue3jKrTWmct/YVk=").unwrap();
        assert_eq!(
            password(&key, "myhub.azure-devices.net", "dev-001", 1_700_000_000),
            "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev-001&sig=dH%2FBOMR1yoMPfNtctGZIUYUiSuahGqtr5h9gHwcq60Q%3D&se=1700000000"
        );
        let mut p = Properties::default();
        assert_eq!(telemetry_topic("dev-001", &p), "devices/dev-001/messages/events/");
        p.system.insert("message-id".into(), "m 1".into());
        p.system.insert("content-type".into(), "application/json".into());
        p.system.insert("content-encoding".into(), "utf-8".into());
        p.application.insert("temp alert".into(), "a/b&c".into());
        assert_eq!(
            telemetry_topic("dev-001", &p),
            "devices/dev-001/messages/events/%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&temp%20alert=a%2Fb%26c"
        );
        assert_eq!(c2d_filter("dev-001"), "devices/dev-001/messages/devicebound/#");
    }

    #[test]
    fn c2d_bags() {
        let p = c2d_properties(
            "%24.mid=c2d%2042&%24.to=%2Fdevices%2Fd%2Fmessages%2FdeviceBound&$.cdid=x&iothub-ack=full&flag",
        );
        assert_eq!(p.system["message-id"], "c2d 42");
        assert_eq!(p.system["to"], "/devices/d/messages/deviceBound");
        assert_eq!(p.system["$.cdid"], "x");
        assert_eq!(p.application["iothub-ack"], "full");
        assert_eq!(p.application["flag"], "");
        assert_eq!(c2d_properties(""), Properties::default());
        assert_eq!(c2d_properties("a=%ff"), Properties::default());
    }
}
