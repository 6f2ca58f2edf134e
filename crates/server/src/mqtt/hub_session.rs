//! One device's IoT hub session over MQTT: telemetry, twin, direct methods, cloud-to-device.
//!
//! The task owns the connection and serves two inputs: packets from the device and
//! [`Outbound`] requests from the service side (desired patches, method calls, new C2D). A
//! telemetry PUBACK is written only after the message is durably appended.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_core::x509::CertificateChain;
use fleetgate_core::AzureError;
use fleetgate_hub::mqtt::{
    c2d_topic, desired_patch_topic, method_request_topic, parse_publish_topic, subscription, telemetry_bag,
    twin_response_topic, will_bag, DeviceRequest, HubUsername, Subscription, TopicError,
};
use fleetgate_hub::sessions::SessionHandle;
use fleetgate_hub::{Authentication, ConnectRefusal};
use fleetgate_hub::{Hub, HubDevice, Outbound};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::{deadline_of, printable, Connection, ConnectionError};
use crate::config::Limits;
use fleetgate_metrics::info_limited;

/// Azure's cap on the keep-alive timeout (1.5 x keep-alive, at most 1767 s).
const MAX_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(1767);
/// On shutdown, how long to wait for packets the device already sent.
const SHUTDOWN_READ: Duration = Duration::from_millis(100);
/// Azure allows five subscriptions per device.
const MAX_SUBSCRIPTIONS: usize = 5;

struct Session<S> {
    conn: Connection<S>,
    hub: Arc<Hub>,
    device: HubDevice,
    /// This connection's session id: answers to method calls count only when they come back on
    /// the connection the call went out on.
    id: u64,
    next_packet_id: u16,
    /// Granted QoS per stream the device subscribed to.
    subscriptions: HashMap<Subscription, QoS>,
    /// Our QoS 1 C2D publishes awaiting the device's PUBACK: packet id → message id.
    c2d_in_flight: HashMap<u16, String>,
    /// CleanSession 0: subscriptions are saved as they change.
    persistent: bool,
    /// The CONNECT's Will (property bag as it will be ingested, body), when on the device's
    /// telemetry topic: ingested if the connection ends without DISCONNECT. Cleared by a
    /// DISCONNECT and when the server ends the session itself (replaced by a new connection,
    /// identity changed, credentials expired, shutdown): the device did not drop then.
    will: Option<(String, bytes::Bytes)>,
}

/// Records a change of subscription where the service side reads it; a device now listening
/// for methods wakes the calls waiting for it (`connectTimeoutInSeconds`).
fn set_flag(hub: &Hub, device: &HubDevice, flags: &fleetgate_hub::SessionFlags, sub: Subscription, on: bool) {
    match sub {
        Subscription::Methods => {
            flags.methods.store(on, Ordering::Release);
            if on {
                hub.listening_for_methods(device);
            }
        }
        Subscription::DesiredPatches => flags.desired.store(on, Ordering::Relaxed),
        Subscription::CloudToDevice => flags.c2d.store(on, Ordering::Relaxed),
        Subscription::TwinResponses => {}
    }
}

// What a session starts from: the connection, its CONNECT, who (username, certificate chain,
// address) and the shared state; grouping them would only move the list.
#[allow(clippy::too_many_arguments)]
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    conn: Connection<S>,
    connect: Connect,
    user: HubUsername,
    peer: Option<CertificateChain>,
    source: Option<IpAddr>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    // Two phases, each boxed: what a connection keeps while idle is the second one's state only.
    let Some((session, handle, idle)) = Box::pin(open(conn, connect, user, peer, source, &hub, &limits)).await? else {
        return Ok(());
    };
    Box::pin(serve(session, handle, idle, shutdown)).await
}

/// CONNECT to CONNACK: authentication, the device's stored session, pending C2D messages.
/// `None` when the device was refused (and told so).
async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Connection<S>,
    connect: Connect,
    user: HubUsername,
    peer: Option<CertificateChain>,
    source: Option<IpAddr>,
    hub: &Arc<Hub>,
    limits: &Limits,
) -> Result<Option<(Session<S>, SessionHandle, Duration)>, ConnectionError> {
    let refuse = |code| Packet::ConnAck(ConnAck::new(code, false));
    if user.module_id.is_some() {
        info_limited!("module identities are not supported yet; refusing");
        conn.write_packet(refuse(ConnectReturnCode::NotAuthorized)).await?;
        return Ok(None);
    }
    if connect.client_id != user.device_id {
        info_limited!("refused hub CONNECT: client id is not the device id");
        conn.write_packet(refuse(ConnectReturnCode::BadClientId)).await?;
        return Ok(None);
    }
    // A source that failed authentication too often is told to come back later, unchecked
    // (CONNACK 3: every SDK retries it), before it costs a store read.
    if hub.audit().admit(source).is_err() {
        conn.write_packet(refuse(ConnectReturnCode::ServiceUnavailable)).await?;
        return Ok(None);
    }
    let password = connect.login.as_ref().map(|l| l.password.as_str()).filter(|p| !p.is_empty());
    // Every await but the loop's read is boxed: the session future is what an idle connection
    // keeps, so it should hold only what the loop needs.
    let checked = Box::pin(hub.authenticate(&user.host_name, &user.device_id, password, peer.as_ref(), source)).await;
    let device = match checked {
        Authentication::Identified(d) => d,
        // Bad key, unknown device and disabled device all get "not authorized": the SDKs stop
        // retrying on it, and it tells a stranger nothing about which devices exist.
        Authentication::Refused(
            ConnectRefusal::UnknownHub
            | ConnectRefusal::UnknownDevice
            | ConnectRefusal::BadCredentials
            | ConnectRefusal::Disabled,
        ) => {
            conn.write_packet(refuse(ConnectReturnCode::NotAuthorized)).await?;
            return Ok(None);
        }
        // The store could not be read: "server unavailable", which every SDK retries; "not
        // authorized" would stop the device for good over a fault of ours.
        Authentication::CouldNotCheck => {
            conn.write_packet(refuse(ConnectReturnCode::ServiceUnavailable)).await?;
            return Ok(None);
        }
    };
    // The hub's connect quota is spent by authenticated devices only, under the hub's own name:
    // taken before authentication, a stranger's refused CONNECTs (a handful of addresses under
    // the per-source limit) kept the quota empty for every device of the hub, and each host name
    // a CONNECT made up added a bucket that was never freed.
    if !hub.admit_connect(&device.hub) {
        conn.write_packet(refuse(ConnectReturnCode::ServiceUnavailable)).await?;
        return Ok(None);
    }
    conn.set_max_packet(hub.config().max_message_bytes + 16 * 1024);
    // CleanSession 0: the device's subscriptions outlive the connection (and a restart); the
    // SDKs count on that and do not subscribe again when they reconnect.
    let persistent = !connect.clean_session;
    let restored = if persistent {
        Box::pin(hub.load_subscriptions(&device)).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not load the device's session; starting clean");
            None
        })
    } else {
        if let Err(e) = Box::pin(hub.save_subscriptions(&device, None)).await {
            tracing::warn!(error = %e, "could not clear the device's session");
        }
        None
    };
    let Some(handle) = hub.connect_session(&device) else {
        // The device was disabled, deleted or given other credentials since `authenticate` read
        // its identity. "Server unavailable": the SDKs retry, and the retry is authenticated on
        // what the identity is now (refused if the credentials are gone).
        conn.write_packet(refuse(ConnectReturnCode::ServiceUnavailable)).await?;
        return Ok(None);
    };
    conn.write_packet(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, restored.is_some()))).await?;
    tracing::info!(hub = %device.hub, session_present = restored.is_some(), "device connected");

    let idle = match connect.keep_alive {
        0 => limits.idle_timeout,
        k => Duration::from_millis(u64::from(k) * 1500).min(MAX_KEEP_ALIVE_TIMEOUT),
    };
    // IoT Hub forwards a Will only from the device's telemetry topic; any other is ignored.
    let will = connect.last_will.as_ref().and_then(|w| {
        let Some(bag) = will_bag(&w.topic, &device.device_id) else {
            info_limited!(topic = %printable(&w.topic), "Will on another topic than the device's telemetry; ignored");
            return None;
        };
        Some((telemetry_bag(&bag, w.retain, true).into_owned(), w.message.clone()))
    });
    // What the connection keeps for its life should be small: the CONNECT (with its SAS token),
    // the username and the certificate chain are not needed any more.
    drop((connect, user, peer));
    let mut s = Session {
        conn,
        hub: hub.clone(),
        device: device.clone(),
        id: handle.id,
        next_packet_id: 0,
        subscriptions: HashMap::new(),
        c2d_in_flight: HashMap::new(),
        persistent,
        will,
    };
    for (sub, qos) in restored.unwrap_or_default() {
        s.subscriptions.insert(sub, if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce });
        set_flag(hub, &device, &handle.flags, sub, true);
    }
    if let Err(e) = Box::pin(s.deliver_c2d()).await {
        hub.disconnect_session(&device, handle.id);
        return Err(e);
    }
    Ok(Some((s, handle, idle)))
}

/// The connected device's session until it disconnects, goes idle past its keep-alive, is
/// replaced or closed by the service side, its credentials expire, or the server stops.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: Session<S>,
    handle: SessionHandle,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    // The waits that outlive one packet are made once, not per packet: a telemetry message then
    // costs no timer insert/remove and no waiter registrations (they were ~5% of the CPU per
    // message). The idle deadline moves with each packet; the timer is only re-armed when it
    // fires early.
    let mut deadline = tokio::time::Instant::now() + idle;
    // The same timer ends the session when the credentials it was opened with expire (a SAS
    // token, a certificate), as Azure does; the SDKs reconnect with fresh ones. One timer, not
    // two: an idle connection keeps it for its life.
    let expires = s.device.credentials_expire().map(deadline_of);
    let wake = |deadline: tokio::time::Instant| expires.map_or(deadline, |e| e.min(deadline));
    let mut idle_timer = std::pin::pin!(tokio::time::sleep_until(wake(deadline)));
    let mut outbound = std::pin::pin!(handle.rx.recv());
    let mut stop = std::pin::pin!(shutdown.changed());
    let result = loop {
        tokio::select! {
            r = s.conn.read_packet() => {
                let packet = match r {
                    Err(e) => break Err(e),
                    Ok(None) => break Ok(()),
                    Ok(Some(p)) => p,
                };
                let now = tokio::time::Instant::now();
                // The timer may be due with packets still arriving (select! picks among ready
                // branches at random): no packet is served once the credentials have expired.
                if expires.is_some_and(|e| now >= e) {
                    tracing::info!(hub = %s.device.hub, "the device's credentials expired; closing");
                    s.will = None;
                    break Ok(());
                }
                deadline = now + idle;
                match Box::pin(s.on_packet(packet, &handle.flags)).await {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
            out = &mut outbound => {
                // Nor is anything sent to it: a method call then fails at once with the
                // connection, a C2D message stays queued for the next one.
                if expires.is_some_and(|e| tokio::time::Instant::now() >= e) {
                    tracing::info!(hub = %s.device.hub, "the device's credentials expired; closing");
                    s.will = None;
                    break Ok(());
                }
                outbound.set(handle.rx.recv());
                match Box::pin(s.on_outbound(out)).await {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
            () = &mut idle_timer => {
                let now = tokio::time::Instant::now();
                if expires.is_some_and(|e| now >= e) {
                    tracing::info!(hub = %s.device.hub, "the device's credentials expired; closing");
                    s.will = None;
                    break Ok(());
                }
                if now >= deadline {
                    break Ok(()); // silent past 1.5 x keep-alive
                }
                idle_timer.as_mut().reset(wake(deadline));
            }
            _ = &mut stop => {
                // A graceful stop still serves what the device already sent (a message in the
                // socket gets its append and PUBACK), then closes.
                while let Ok(Ok(Some(p))) = tokio::time::timeout(SHUTDOWN_READ, s.conn.read_packet()).await {
                    if !matches!(Box::pin(s.on_packet(p, &handle.flags)).await, Ok(true)) {
                        break;
                    }
                }
                s.will = None;
                break Ok(());
            }
        }
    };
    if let Some((bag, body)) = s.will.take() {
        // The connection dropped without DISCONNECT (closed, broken, silent past its keep-alive,
        // or closed for a protocol violation): IoT Hub forwards the Will as telemetry.
        match Box::pin(s.hub.ingest(&s.device, &bag, body)).await {
            Ok(_) => {
                tracing::info!(hub = %s.device.hub, "connection dropped; Will forwarded")
            }
            Err(e) => tracing::info!(hub = %s.device.hub, error = %e, "Will refused"),
        }
    }
    s.hub.disconnect_session(&s.device, handle.id);
    s.conn.shutdown().await;
    tracing::info!(hub = %s.device.hub, "device disconnected");
    result
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn packet_id(&mut self) -> u16 {
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        self.next_packet_id
    }

    async fn publish(&mut self, topic: String, qos: QoS, body: Vec<u8>) -> Result<u16, ConnectionError> {
        let mut p = Publish::new(topic, qos, body);
        if qos != QoS::AtMostOnce {
            p.pkid = self.packet_id();
        }
        let pkid = p.pkid;
        self.conn.write_packet(Packet::Publish(p)).await?;
        Ok(pkid)
    }

    /// Persists the subscriptions of a CleanSession-0 device before they are acknowledged.
    async fn save_subscriptions(&mut self) {
        if !self.persistent {
            return;
        }
        let subs: Vec<_> =
            self.subscriptions.iter().map(|(s, q)| (*s, if *q == QoS::AtMostOnce { 0 } else { 1 })).collect();
        if let Err(e) = self.hub.save_subscriptions(&self.device, Some(&subs)).await {
            tracing::warn!(error = %e, "could not persist the device's subscriptions");
        }
    }

    fn qos_for(&self, s: Subscription) -> QoS {
        self.subscriptions.get(&s).copied().unwrap_or(QoS::AtLeastOnce)
    }

    /// Handles one packet from the device; `false` ends the session.
    async fn on_packet(
        &mut self,
        packet: Packet,
        flags: &fleetgate_hub::SessionFlags,
    ) -> Result<bool, ConnectionError> {
        match packet {
            Packet::Subscribe(sub) => {
                let mut codes = Vec::new();
                let mut deliver_c2d = false;
                for f in &sub.filters {
                    let granted = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                    match subscription(&f.path, &self.device.device_id) {
                        Some(s)
                            if self.subscriptions.len() < MAX_SUBSCRIPTIONS || self.subscriptions.contains_key(&s) =>
                        {
                            self.subscriptions.insert(s, granted);
                            set_flag(&self.hub, &self.device, flags, s, true);
                            deliver_c2d |= s == Subscription::CloudToDevice;
                            codes.push(SubscribeReasonCode::Success(granted));
                        }
                        _ => {
                            tracing::info!(filter = %printable(&f.path), "refused subscription");
                            codes.push(SubscribeReasonCode::Failure);
                        }
                    }
                }
                self.save_subscriptions().await;
                self.conn.write_packet(Packet::SubAck(SubAck::new(sub.pkid, codes))).await?;
                if deliver_c2d {
                    self.deliver_c2d().await?;
                }
                Ok(true)
            }
            Packet::Unsubscribe(u) => {
                for f in &u.topics {
                    if let Some(s) = subscription(f, &self.device.device_id) {
                        self.subscriptions.remove(&s);
                        set_flag(&self.hub, &self.device, flags, s, false);
                    }
                }
                self.save_subscriptions().await;
                self.conn.write_packet(Packet::UnsubAck(UnsubAck::new(u.pkid))).await?;
                Ok(true)
            }
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubAck(a) => {
                if let Some(id) = self.c2d_in_flight.remove(&a.pkid) {
                    if let Err(e) = self.hub.complete_c2d(&self.device, &id).await {
                        tracing::warn!(error = %e, "could not complete a delivered C2D message; it will be redelivered");
                    }
                }
                Ok(true)
            }
            Packet::PingReq => {
                self.conn.write_packet(Packet::PingResp).await?;
                Ok(true)
            }
            Packet::Disconnect => {
                // A clean end: the Will is discarded (MQTT 3.1.1, 3.14.4).
                self.will = None;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    async fn on_publish(&mut self, p: Publish) -> Result<bool, ConnectionError> {
        if p.qos == QoS::ExactlyOnce {
            tracing::info!("QoS 2 is not supported; closing");
            return Ok(false);
        }
        let request = match parse_publish_topic(&p.topic, &self.device.device_id) {
            Ok(r) => r,
            Err(TopicError::Forbidden) => {
                tracing::warn!(topic = %printable(&p.topic), "publish to another device's topic; closing");
                return Ok(false);
            }
            Err(_) => {
                tracing::info!(topic = %printable(&p.topic), "publish to an unknown topic; closing");
                return Ok(false);
            }
        };
        match request {
            DeviceRequest::Telemetry { bag } => {
                match self.hub.ingest(&self.device, &telemetry_bag(&bag, p.retain, false), p.payload.clone()).await {
                    Ok(_) => {
                        if p.qos == QoS::AtLeastOnce {
                            self.conn.write_packet(Packet::PubAck(PubAck::new(p.pkid))).await?;
                        }
                        Ok(true)
                    }
                    // Telemetry has no response topic: Azure drops the connection, and the SDK
                    // retries (or reports) the unacknowledged message.
                    Err(e) => {
                        tracing::info!(error = %e, "telemetry refused; closing");
                        Ok(false)
                    }
                }
            }
            DeviceRequest::TwinGet { rid } => {
                self.ack(&p)?;
                let (status, body) = match self.hub.twin(&self.device.hub, &self.device.device_id).await {
                    Ok((_, twin)) => (200, twin.device_view().to_string().into_bytes()),
                    Err(e) => (e.status(), twin_error(&e)),
                };
                let qos = self.qos_for(Subscription::TwinResponses);
                self.publish(twin_response_topic(status, &rid, None), qos, body).await?;
                Ok(true)
            }
            DeviceRequest::TwinPatchReported { rid } => {
                self.ack(&p)?;
                let (topic, body) = match self.hub.patch_reported(&self.device, &p.payload).await {
                    Ok(version) => (twin_response_topic(204, &rid, Some(version)), Vec::new()),
                    Err(e) => (twin_response_topic(e.status(), &rid, None), twin_error(&e)),
                };
                let qos = self.qos_for(Subscription::TwinResponses);
                self.publish(topic, qos, body).await?;
                Ok(true)
            }
            DeviceRequest::MethodResponse { status, rid } => {
                self.ack(&p)?;
                self.conn.flush().await?;
                self.hub.method_response(&self.device, self.id, &rid, status, &p.payload);
                Ok(true)
            }
        }
    }

    /// Queues the PUBACK of a request: it goes out with the response (ahead of it), or with the
    /// next flush.
    fn ack(&mut self, p: &Publish) -> Result<(), ConnectionError> {
        if p.qos == QoS::AtLeastOnce {
            self.conn.queue_packet(Packet::PubAck(PubAck::new(p.pkid)))?;
        }
        Ok(())
    }

    async fn on_outbound(&mut self, out: Outbound) -> Result<bool, ConnectionError> {
        match out {
            Outbound::Close => {
                self.will = None;
                tracing::info!("closing: replaced by a new connection, or the identity was disabled, deleted or given new credentials");
                Ok(false)
            }
            Outbound::DesiredPatch(patch) => {
                if self.subscriptions.contains_key(&Subscription::DesiredPatches) {
                    let qos = self.qos_for(Subscription::DesiredPatches);
                    self.publish(desired_patch_topic(patch.version), qos, patch.body.to_string().into_bytes()).await?;
                }
                Ok(true)
            }
            Outbound::Method(call) => {
                let qos = self.qos_for(Subscription::Methods);
                let body = if call.payload.is_null() { Vec::new() } else { call.payload.to_string().into_bytes() };
                self.publish(method_request_topic(&call.name, &call.rid), qos, body).await?;
                Ok(true)
            }
            Outbound::CloudToDevice => {
                self.deliver_c2d().await?;
                Ok(true)
            }
        }
    }

    /// Sends queued C2D messages not already in flight. QoS 1 deliveries are completed by the
    /// device's PUBACK; unacknowledged ones are sent again on the next connection.
    async fn deliver_c2d(&mut self) -> Result<(), ConnectionError> {
        let Some(&qos) = self.subscriptions.get(&Subscription::CloudToDevice) else { return Ok(()) };
        let pending = match self.hub.pending_c2d(&self.device).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the C2D queue");
                return Ok(());
            }
        };
        for m in pending {
            if self.c2d_in_flight.values().any(|id| *id == m.id) {
                continue;
            }
            let topic = c2d_topic(&self.device.device_id, &m.properties.to_bag());
            let pkid = self.publish(topic, qos, m.body.clone()).await?;
            if qos == QoS::AtMostOnce {
                let _ = self.hub.complete_c2d(&self.device, &m.id).await;
            } else {
                self.c2d_in_flight.insert(pkid, m.id);
            }
        }
        Ok(())
    }
}

/// Twin error bodies carry `errorCode` and `message`: Node fails a twin request only when the
/// body has an `errorCode`.
fn twin_error(e: &AzureError) -> Vec<u8> {
    json!({"errorCode": e.code.code(), "message": e.message}).to_string().into_bytes()
}
