//! The measurements. Each takes a running server, drives it from this process and reads the
//! server's CPU and memory from /proc around the measured phase.
//!
//! Fleetgate is driven with the project's device client (`fleetgate_client::device`);
//! Mosquitto with rumqttc and the same rustls configuration, built per connection as the device
//! client does. Idle connections use a minimal MQTT client on tokio-rustls for both servers,
//! because they must bind a source address before connecting (rumqttc cannot).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use fleetgate_client::device::{self, DeviceError, HubClient, HubOptions, RegisterOptions};
use fleetgate_core::message::Properties;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet as WirePacket};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::servers::{FleetgateInstance, MosquittoFiles, Server};
use crate::util::{machine_busy_seconds, own_cpu_seconds, tcp_ext, Failures, Latencies, Summary};

/// Registration (and device) id of the bench's device `i`.
pub fn device_id(i: usize) -> String {
    format!("bench-{i:06}")
}

/// What a device's Mosquitto password is: its derived key, as Fleetgate would know it.
pub fn mosquitto_password(inst_key: &fleetgate_core::keys::SymmetricKey, i: usize) -> String {
    inst_key.derive_device_key(&device_id(i)).to_base64()
}

const LOOPBACK: &str = "127.0.0.1";
/// Connections opened at once while setting up telemetry and idle runs.
const CONNECT_CONCURRENCY: usize = 64;

/// Runs `op(i)` for every `i` in `range` with `concurrency` workers; times each success.
async fn pool<F, Fut>(range: Range<usize>, concurrency: usize, op: F) -> (Latencies, Failures)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let next = Arc::new(AtomicUsize::new(range.start));
    let op = Arc::new(op);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (next, op, end) = (next.clone(), op.clone(), range.end);
        workers.spawn(async move {
            let (mut lat, mut fail) = (Latencies::default(), Failures::default());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let started = Instant::now();
                match op(i).await {
                    Ok(()) => lat.push(started.elapsed()),
                    Err(reason) => fail.add(reason),
                }
            }
            (lat, fail)
        });
    }
    let (mut lat, mut fail) = (Latencies::default(), Failures::default());
    while let Some(r) = workers.join_next().await {
        let (l, f) = r.expect("a worker panicked");
        lat.extend(l);
        fail.merge(f);
    }
    (lat, fail)
}

/// Server CPU and wall time around a measured phase, plus our own CPU and everyone else's.
struct Meter {
    pid_cpu: f64,
    own_cpu: f64,
    machine: f64,
    overflows: u64,
    started: Instant,
}

/// What a [`Meter`] saw.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Measured {
    pub wall_s: f64,
    pub server_cpu_s: f64,
    pub generator_cpu_s: f64,
    /// CPU seconds every other process on the machine used meanwhile (a quiet machine: ~0).
    pub others_cpu_s: f64,
    /// Connection attempts dropped because a listen queue was full (`TcpExt ListenOverflows`).
    pub listen_overflows: u64,
}

impl Meter {
    fn start(server: &Server) -> anyhow::Result<Self> {
        Ok(Meter {
            pid_cpu: server.cpu_seconds()?,
            own_cpu: own_cpu_seconds(),
            machine: machine_busy_seconds(),
            overflows: tcp_ext("ListenOverflows"),
            started: Instant::now(),
        })
    }
    fn stop(&self, server: &Server) -> anyhow::Result<Measured> {
        let wall = self.started.elapsed();
        let server_cpu = server.cpu_seconds()? - self.pid_cpu;
        let generator = own_cpu_seconds() - self.own_cpu;
        let machine = machine_busy_seconds() - self.machine;
        Ok(Measured {
            wall_s: wall.as_secs_f64(),
            server_cpu_s: server_cpu,
            generator_cpu_s: generator,
            others_cpu_s: (machine - server_cpu - generator).max(0.0),
            listen_overflows: tcp_ext("ListenOverflows").saturating_sub(self.overflows),
        })
    }
}

fn per_second(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

pub fn per_op(total: f64, n: usize) -> f64 {
    if n > 0 {
        total / n as f64
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------
// Provisioning storm

#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    pub server: String,
    /// What one operation is.
    pub operation: String,
    pub devices: usize,
    pub concurrency: usize,
    pub ok: usize,
    pub failures: Failures,
    pub per_s: f64,
    pub latency: Summary,
    pub server_cpu_per_op_ms: f64,
    pub server_rss_kib: u64,
    pub server_peak_rss_kib: u64,
    #[serde(flatten)]
    pub m: Measured,
}

fn storm_result(
    server: &Server,
    operation: &str,
    range: &Range<usize>,
    concurrency: usize,
    m: Measured,
    mut lat: Latencies,
    failures: Failures,
) -> anyhow::Result<StormResult> {
    let latency = lat.summary();
    let (rss, peak) = server.memory_kib()?;
    Ok(StormResult {
        server: server.name.into(),
        operation: operation.into(),
        devices: range.len(),
        concurrency,
        ok: latency.count,
        failures,
        per_s: per_second(latency.count, m.wall_s),
        latency,
        server_cpu_per_op_ms: per_op(m.server_cpu_s * 1e3, latency.count),
        server_rss_kib: rss,
        server_peak_rss_kib: peak,
        m,
    })
}

/// Full DPS registrations over MQTT/TLS, one fresh connection per device.
pub async fn storm_fleetgate(
    server: &Server,
    inst: &FleetgateInstance,
    range: Range<usize>,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<StormResult> {
    let inst = Arc::new(inst.clone());
    let port = server.port;
    let meter = Meter::start(server)?;
    let (lat, failures) = pool(range.clone(), concurrency, move |i| {
        let inst = inst.clone();
        async move {
            let id = device_id(i);
            let key = inst.group_key.derive_device_key(&id);
            let mut o = RegisterOptions::new(LOOPBACK, inst.ca_pem.clone(), &inst.id_scope, &id, key);
            o.port = port;
            o.timeout = timeout;
            match device::register(&o).await {
                Ok(r) if r.device_id == id => Ok(()),
                Ok(r) => Err(format!("assigned the wrong device id {}", r.device_id)),
                Err(e) => Err(e.reason()),
            }
        }
    })
    .await;
    let m = meter.stop(server)?;
    storm_result(server, "DPS registration", &range, concurrency, m, lat, failures)
}

/// Mosquitto's nearest equivalent of a registration: connect, subscribe to the device's
/// response topic, publish a request at QoS 1 to it, receive it back (PUBACK both ways),
/// disconnect.
pub async fn storm_mosquitto(
    server: &Server,
    files: &MosquittoFiles,
    key: &fleetgate_core::keys::SymmetricKey,
    range: Range<usize>,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<StormResult> {
    let (addr, ca, key) = (server.addr(), Arc::new(files.ca_pem.clone()), Arc::new(key.clone()));
    let meter = Meter::start(server)?;
    let (lat, failures) = pool(range.clone(), concurrency, move |i| {
        let (ca, key) = (ca.clone(), key.clone());
        async move {
            let id = device_id(i);
            let password = mosquitto_password(&key, i);
            match tokio::time::timeout(timeout, mosquitto_cycle(addr, &ca, &id, &password)).await {
                Ok(r) => r,
                Err(_) => Err(DeviceError::Timeout.reason()),
            }
        }
    })
    .await;
    let m = meter.stop(server)?;
    storm_result(server, "connect+subscribe+publish QoS 1+receive+disconnect", &range, concurrency, m, lat, failures)
}

async fn mosquitto_cycle(addr: SocketAddr, ca: &[u8], id: &str, password: &str) -> Result<(), String> {
    let (client, mut el) = mqtt_client(addr, ca, id, (id, password), true)?;
    let reason = |e: rumqttc::ConnectionError| DeviceError::from(e).reason();
    let closed = |_| DeviceError::Disconnected.reason();
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.map_err(reason)? {
            break;
        }
    }
    let topic = format!("dps/{id}/res");
    client.try_subscribe(format!("{topic}/#"), QoS::AtLeastOnce).map_err(closed)?;
    loop {
        if let Event::Incoming(Packet::SubAck(s)) = el.poll().await.map_err(reason)? {
            if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                return Err("subscription refused".into());
            }
            break;
        }
    }
    let body = device::provisioning::register_body(id, None);
    client.try_publish(format!("{topic}/200"), QoS::AtLeastOnce, false, body).map_err(closed)?;
    let (mut acked, mut received) = (false, false);
    while !(acked && received) {
        match el.poll().await.map_err(reason)? {
            Event::Incoming(Packet::PubAck(_)) => acked = true,
            Event::Incoming(Packet::Publish(_)) => received = true,
            _ => {}
        }
    }
    disconnect(&client, &mut el).await;
    Ok(())
}

/// Sends DISCONNECT and drives the event loop until it is out (at most a second).
async fn disconnect(client: &AsyncClient, el: &mut EventLoop) {
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(ev) = el.poll().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// A rumqttc client for Mosquitto, configured like the device client's connections (fresh
/// rustls configuration, keep-alive 60 s, the same packet and channel limits).
fn mqtt_client(
    addr: SocketAddr,
    ca: &[u8],
    id: &str,
    (username, password): (&str, &str),
    clean_session: bool,
) -> Result<(AsyncClient, EventLoop), String> {
    let tls = crate::tls::client_config(ca, false).map_err(|e| e.to_string())?;
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials(username, password)
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(clean_session)
        .set_max_packet_size(272 * 1024, 272 * 1024)
        .set_request_channel_capacity(64)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut el) = AsyncClient::new(o, 64);
    let mut net = el.network_options();
    net.set_connection_timeout(30);
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    Ok((client, el))
}

// ---------------------------------------------------------------------------------------------
// Telemetry

#[derive(Debug, Clone, Serialize)]
pub struct TelemetryResult {
    pub server: String,
    pub variant: String,
    /// Which of the interleaved rounds (1-based).
    pub round: usize,
    pub devices: usize,
    pub connected: usize,
    pub seconds: f64,
    pub body_bytes: usize,
    pub acked: usize,
    pub failures: Failures,
    pub per_s: f64,
    pub latency: Summary,
    pub server_cpu_per_msg_us: f64,
    pub server_rss_kib: u64,
    #[serde(flatten)]
    pub m: Measured,
}

/// A JSON body of exactly `size` bytes (when `size` allows).
pub fn telemetry_body(device_id: &str, size: usize) -> Vec<u8> {
    let base = format!("{{\"deviceId\":\"{device_id}\",\"temperature\":21.5,\"pad\":\"\"}}");
    let pad = size.saturating_sub(base.len());
    format!("{{\"deviceId\":\"{device_id}\",\"temperature\":21.5,\"pad\":\"{}\"}}", "x".repeat(pad)).into_bytes()
}

/// The properties every telemetry message carries (as an SDK sets them).
pub fn telemetry_properties(device_id: &str, seq: u64) -> Properties {
    let mut p = Properties::default();
    p.system.insert("message-id".into(), format!("{device_id}-{seq}"));
    p.system.insert("content-type".into(), "application/json".into());
    p.system.insert("content-encoding".into(), "utf-8".into());
    p.application.insert("source".into(), "fleetgate-bench".into());
    p
}

#[allow(clippy::too_many_arguments)]
fn telemetry_result(
    server: &Server,
    variant: &str,
    devices: usize,
    connected: usize,
    seconds: f64,
    body_bytes: usize,
    m: Measured,
    mut lat: Latencies,
    failures: Failures,
) -> anyhow::Result<TelemetryResult> {
    let latency = lat.summary();
    Ok(TelemetryResult {
        server: server.name.into(),
        variant: variant.into(),
        round: 1,
        devices,
        connected,
        seconds,
        body_bytes,
        acked: latency.count,
        failures,
        per_s: per_second(latency.count, m.wall_s),
        latency,
        server_cpu_per_msg_us: per_op(m.server_cpu_s * 1e6, latency.count),
        server_rss_kib: server.memory_kib()?.0,
        m,
    })
}

/// `devices` hub devices connected at once, each sending QoS 1 telemetry one message at a time
/// (the next when the previous is acknowledged) for `seconds`.
pub async fn telemetry_fleetgate(
    server: &Server,
    inst: &FleetgateInstance,
    devices: Range<usize>,
    seconds: f64,
    body_bytes: usize,
) -> anyhow::Result<TelemetryResult> {
    let n = devices.len();
    let mut failures = Failures::default();
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut connecting = JoinSet::new();
    for i in devices {
        let (limit, inst, port) = (limit.clone(), inst.clone(), server.port);
        connecting.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("never closed");
            let id = device_id(i);
            let key = inst.group_key.derive_device_key(&id);
            let mut o = HubOptions::new(LOOPBACK, inst.ca_pem.clone(), &inst.hub_host_name, &id, key);
            o.port = port;
            HubClient::connect(&o).await.map(|c| (id, c))
        });
    }
    let mut clients = Vec::new();
    while let Some(r) = connecting.join_next().await {
        match r.expect("connect task panicked") {
            Ok(c) => clients.push(c),
            Err(e) => failures.add(format!("connect: {}", e.reason())),
        }
    }
    let connected = clients.len();

    let meter = Meter::start(server)?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut senders = JoinSet::new();
    for (id, hub) in clients {
        senders.spawn(async move {
            let (mut lat, mut fail) = (Latencies::default(), Failures::default());
            let body = telemetry_body(&id, body_bytes);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                let props = telemetry_properties(&id, seq);
                let started = Instant::now();
                match hub.send_telemetry(body.clone(), &props).await {
                    Ok(()) => lat.push(started.elapsed()),
                    Err(e) => {
                        fail.add(format!("send: {}", e.reason()));
                        break;
                    }
                }
            }
            (hub, lat, fail)
        });
    }
    let (mut lat, mut hubs) = (Latencies::default(), Vec::new());
    while let Some(r) = senders.join_next().await {
        let (hub, l, f) = r.expect("sender panicked");
        lat.extend(l);
        failures.merge(f);
        hubs.push(hub);
    }
    let m = meter.stop(server)?;
    let result = telemetry_result(
        server,
        "fleetgate-client, durable append",
        n,
        connected,
        seconds,
        body_bytes,
        m,
        lat,
        failures,
    );
    let mut closing = JoinSet::new();
    for hub in hubs {
        closing.spawn(async move {
            let _ = hub.disconnect().await;
        });
    }
    while closing.join_next().await.is_some() {}
    result
}

/// The same load through one plain MQTT client loop (rumqttc, the publish and its PUBACK on the
/// device's own task), for Fleetgate and Mosquitto alike: the same topics (with the property
/// bag), bodies and QoS, so the generator's cost per message is the same for both servers.
pub async fn telemetry_mqtt(
    server: &Server,
    login: &Login,
    variant: &str,
    devices: Range<usize>,
    seconds: f64,
    body_bytes: usize,
) -> anyhow::Result<TelemetryResult> {
    let n = devices.len();
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for i in devices {
        let (limit, ca, addr) = (limit.clone(), login.ca_pem().to_vec(), server.addr());
        let (credentials, ready_tx, mut start_rx) = (login.credentials(i), ready_tx.clone(), start_rx.clone());
        tasks.spawn(async move {
            let (mut lat, mut fail) = (Latencies::default(), Failures::default());
            let id = device_id(i);
            let permit = limit.acquire_owned().await.expect("never closed");
            let connected = async {
                let (username, password) = (&credentials.0, &credentials.1);
                let (client, mut el) = mqtt_client(addr, &ca, &id, (username, password), false)?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    match tokio::time::timeout_at(deadline, el.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, el)),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(DeviceError::from(e).reason()),
                        Err(_) => return Err(DeviceError::Timeout.reason()),
                    }
                }
            }
            .await;
            drop(permit);
            let (client, mut el) = match connected {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("connect: {e}")));
                    return (None, lat, fail);
                }
            };
            let deadline = loop {
                if let Some(d) = *start_rx.borrow_and_update() {
                    break d;
                }
                if start_rx.changed().await.is_err() {
                    return (None, lat, fail);
                }
            };
            let body = telemetry_body(&id, body_bytes);
            let mut seq = 0u64;
            'send: while Instant::now() < deadline {
                seq += 1;
                let topic = device::hub::telemetry_topic(&id, &telemetry_properties(&id, seq));
                let started = Instant::now();
                if client.publish(topic, QoS::AtLeastOnce, false, body.clone()).await.is_err() {
                    fail.add("send: disconnected");
                    break;
                }
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => break,
                        Ok(_) => {}
                        Err(e) => {
                            fail.add(format!("send: {}", DeviceError::from(e).reason()));
                            break 'send;
                        }
                    }
                }
                lat.push(started.elapsed());
            }
            (Some((client, el)), lat, fail)
        });
    }
    drop(ready_tx);
    let (mut failures, mut connected) = (Failures::default(), 0);
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => connected += 1,
            Some(Err(e)) => failures.add(e),
            None => break,
        }
    }
    let meter = Meter::start(server)?;
    let _ = start_tx.send(Some(Instant::now() + Duration::from_secs_f64(seconds)));
    let (mut lat, mut conns) = (Latencies::default(), Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (conn, l, f) = r.expect("sender panicked");
        lat.extend(l);
        failures.merge(f);
        conns.extend(conn);
    }
    let m = meter.stop(server)?;
    let result = telemetry_result(server, variant, n, connected, seconds, body_bytes, m, lat, failures);
    let mut closing = JoinSet::new();
    for (client, mut el) in conns {
        closing.spawn(async move { disconnect(&client, &mut el).await });
    }
    while closing.join_next().await.is_some() {}
    result
}

// ---------------------------------------------------------------------------------------------
// Idle connections

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub server: String,
    pub target: usize,
    pub connected: usize,
    /// Connections that answered a PINGREQ after the measurement.
    pub alive: usize,
    pub failures: Failures,
    pub source_addresses: usize,
    pub connects_per_s: f64,
    pub server_cpu_per_connect_ms: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_connection_kib: f64,
    pub server_peak_rss_kib: u64,
    pub generator_rss_kib: u64,
    /// The connecting phase.
    #[serde(flatten)]
    pub m: Measured,
}

/// How a bench device identifies itself to the server under test.
pub enum Login {
    /// The hub's username and SAS token, derived like the device client's.
    Fleetgate(FleetgateInstance),
    /// The device id and its Mosquitto password.
    Mosquitto(fleetgate_core::keys::SymmetricKey, Vec<u8>),
}

impl Login {
    /// Device `i`'s MQTT username and password.
    fn credentials(&self, i: usize) -> (String, String) {
        let id = device_id(i);
        match self {
            Login::Fleetgate(inst) => {
                let key = inst.group_key.derive_device_key(&id);
                let expiry = fleetgate_core::time::Timestamp::now().unix_seconds() + device::TOKEN_TTL_SECS;
                let password = device::hub::password(&key, &inst.hub_host_name, &id, expiry);
                (device::hub::username(&inst.hub_host_name, &id), password)
            }
            Login::Mosquitto(key, _) => {
                let password = mosquitto_password(key, i);
                (id, password)
            }
        }
    }

    fn connect_packet(&self, i: usize) -> Connect {
        let mut c = Connect::new(device_id(i));
        c.keep_alive = 1200; // no PINGREQs while we measure
        c.clean_session = false; // as the device SDKs connect to the hub
        let (username, password) = self.credentials(i);
        c.set_login(username, password);
        c
    }

    fn ca_pem(&self) -> &[u8] {
        match self {
            Login::Fleetgate(inst) => &inst.ca_pem,
            Login::Mosquitto(_, ca) => ca,
        }
    }
}

/// Connections per source address: below the 28k ephemeral ports one address has.
pub const PER_SOURCE_ADDRESS: usize = 25_000;

/// `count` device connections (TLS + CONNECT, CONNACK accepted) held open; the server's RSS
/// before and after, per connection.
pub async fn idle(
    server: &Server,
    login: Login,
    count: usize,
    per_source: usize,
    settle: Duration,
) -> anyhow::Result<IdleResult> {
    let sources = count.div_ceil(per_source.max(1)).max(1);
    if sources > 250 {
        bail!("{count} connections at {per_source} per source address need more than 127.0.0.2-127.0.0.251");
    }
    let tls = TlsConnector::from(crate::tls::client_config(login.ca_pem(), false)?);
    let login = Arc::new(login);
    let (rss_before, _) = server.memory_kib()?;
    let meter = Meter::start(server)?;
    let (result_tx, mut result_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (phase_tx, phase_rx) = watch::channel(0u8); // 1: ping, 2: close
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let (tls, login, limit, result_tx, mut phase_rx) =
            (tls.clone(), login.clone(), limit.clone(), result_tx.clone(), phase_rx.clone());
        let addr = server.addr();
        // Beyond one address's ephemeral ports: 127.0.0.2, .3, ... bound before connecting.
        let source = (sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8)));
        tasks.spawn(async move {
            let permit = limit.acquire_owned().await.expect("never closed");
            let connected =
                tokio::time::timeout(Duration::from_secs(30), raw_connect(addr, source, &tls, login.connect_packet(i)))
                    .await
                    .unwrap_or_else(|_| Err("connect: timed out".into()));
            drop(permit);
            let mut stream = match connected {
                Ok(s) => {
                    let _ = result_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = result_tx.send(Err(e));
                    return;
                }
            };
            while *phase_rx.borrow_and_update() < 1 {
                if phase_rx.changed().await.is_err() {
                    return;
                }
            }
            let _ = result_tx.send(ping(&mut stream).await);
            while *phase_rx.borrow_and_update() < 2 {
                if phase_rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let mut failures = Failures::default();
    let mut connected = 0;
    for _ in 0..count {
        match result_rx.recv().await {
            Some(Ok(())) => connected += 1,
            Some(Err(e)) => failures.add(e),
            None => break,
        }
    }
    let m = meter.stop(server)?;
    tokio::time::sleep(settle).await;
    let (rss_after, peak) = server.memory_kib()?;
    let generator_rss = crate::util::memory_kib(std::process::id())?.0;

    let _ = phase_tx.send(1);
    let mut alive = 0;
    for _ in 0..connected {
        match tokio::time::timeout(Duration::from_secs(60), result_rx.recv()).await {
            Ok(Some(Ok(()))) => alive += 1,
            Ok(Some(Err(e))) => failures.add(e),
            _ => break,
        }
    }
    let _ = phase_tx.send(2);
    while tasks.join_next().await.is_some() {}

    Ok(IdleResult {
        server: server.name.into(),
        target: count,
        connected,
        alive,
        failures,
        source_addresses: sources,
        connects_per_s: per_second(connected, m.wall_s),
        server_cpu_per_connect_ms: per_op(m.server_cpu_s * 1e3, connected),
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_kib: if connected > 0 {
            (rss_after as f64 - rss_before as f64) / connected as f64
        } else {
            0.0
        },
        server_peak_rss_kib: peak,
        generator_rss_kib: generator_rss,
        m,
    })
}

async fn raw_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: &TlsConnector,
    connect: Connect,
) -> Result<TlsStream<TcpStream>, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let tcp = socket.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut stream = tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let mut buf = BytesMut::new();
    connect.write(&mut buf).map_err(|e| format!("encoding CONNECT: {e:?}"))?;
    stream.write_all(&buf).await.map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut buf = BytesMut::with_capacity(64);
    loop {
        match WirePacket::read(&mut buf, 64 * 1024) {
            Ok(WirePacket::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => return Ok(stream),
            Ok(WirePacket::ConnAck(ack)) => return Err(format!("connection refused: {:?}", ack.code)),
            Ok(_) => return Err("a packet before CONNACK".into()),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed CONNACK: {e:?}")),
        }
        if stream.read_buf(&mut buf).await.map_err(|e| format!("read: {e}"))? == 0 {
            return Err("closed before CONNACK".into());
        }
    }
}

async fn ping(stream: &mut TlsStream<TcpStream>) -> Result<(), String> {
    let answer = async {
        stream.write_all(&[0xC0, 0x00]).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(16);
        loop {
            match WirePacket::read(&mut buf, 64 * 1024) {
                Ok(WirePacket::PingResp) => return Ok(true),
                Ok(_) => continue,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return Ok(false),
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(false);
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), answer).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err("idle: closed by the server".into()),
        Ok(Err(e)) => Err(format!("idle: {}", std::io::Error::to_string(&e))),
        Err(_) => Err("idle: no PINGRESP".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Cold start

#[derive(Debug, Clone, Serialize)]
pub struct ColdStartResult {
    /// Registrations in the data directory the server starts on.
    pub registrations_in_store: usize,
    pub runs_ms: Vec<f64>,
    pub median_ms: f64,
    pub max_ms: f64,
}

/// Starts `fleetgate serve` on an existing data directory `runs` times; each time measures the
/// time from spawning the process to the first registration it accepts (a device retrying
/// every millisecond from the moment of the spawn).
pub async fn cold_start(
    bin: &std::path::Path,
    inst: &FleetgateInstance,
    log: &std::path::Path,
    registrations_in_store: usize,
    runs: usize,
) -> anyhow::Result<ColdStartResult> {
    let mut runs_ms = Vec::new();
    for r in 0..runs {
        let mut server = crate::servers::spawn_fleetgate(bin, &inst.data_dir, log)?;
        let id = format!("bench-cold-{r:03}");
        let key = inst.group_key.derive_device_key(&id);
        let mut o = RegisterOptions::new(LOOPBACK, inst.ca_pem.clone(), &inst.id_scope, &id, key);
        o.port = server.port;
        o.timeout = Duration::from_secs(10);
        let elapsed = loop {
            match device::register(&o).await {
                Ok(_) => break server.spawned.elapsed(),
                // Not listening yet.
                Err(DeviceError::Transport { .. }) => {
                    server.check_running()?;
                    if server.spawned.elapsed() > Duration::from_secs(30) {
                        bail!("fleetgate accepted no registration within 30 s of starting");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => bail!("cold start registration failed: {}", e.reason()),
            }
        };
        runs_ms.push(elapsed.as_secs_f64() * 1e3);
        server.stop().await;
    }
    let mut sorted = runs_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(ColdStartResult {
        registrations_in_store,
        median_ms: sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
        max_ms: sorted.last().copied().unwrap_or_default(),
        runs_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// TLS floor

#[derive(Debug, Clone, Serialize)]
pub struct TlsFloorResult {
    pub handshakes: usize,
    pub concurrency: usize,
    pub ok: usize,
    pub failures: Failures,
    pub per_s: f64,
    /// Server CPU per full handshake (TCP accept, TLS 1.3 with X25519 and an ECDSA P-256
    /// certificate, close).
    pub server_cpu_per_handshake_ms: f64,
    pub latency: Summary,
    pub resumed_attempts: usize,
    pub resumed: usize,
    pub server_cpu_per_resumption_attempt_ms: f64,
    /// The full handshakes.
    #[serde(flatten)]
    pub m: Measured,
}

/// Bare TLS handshakes against Fleetgate's TLS configuration in a child process: full ones
/// (no resumption, as every device client connection), then with a shared client session cache.
pub async fn tls_floor(dir: &std::path::Path, handshakes: usize, concurrency: usize) -> anyhow::Result<TlsFloorResult> {
    let (mut server, ca) = crate::servers::spawn_tls_server(dir)?;
    server.wait_listening(Duration::from_secs(10)).await?;
    let addr = server.addr();

    let full = TlsConnector::from(crate::tls::client_config(&ca, false)?);
    let meter = Meter::start(&server)?;
    let (mut lat, failures) = pool(0..handshakes, concurrency, move |_| {
        let tls = full.clone();
        async move { handshake(addr, &tls).await.map(|_| ()) }
    })
    .await;
    let full_m = meter.stop(&server)?;
    let latency = lat.summary();

    let resuming = TlsConnector::from(crate::tls::client_config(&ca, true)?);
    let _ = handshake(addr, &resuming).await; // the first one is full and fills the cache
    let resumed = Arc::new(AtomicUsize::new(0));
    let meter = Meter::start(&server)?;
    let counted = resumed.clone();
    let (rlat, rfail) = pool(0..handshakes, concurrency.min(4), move |_| {
        let (tls, counted) = (resuming.clone(), counted.clone());
        async move {
            if handshake(addr, &tls).await? == Some(rustls::HandshakeKind::Resumed) {
                counted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await;
    let resumed_m = meter.stop(&server)?;
    server.stop().await;
    let mut failures = failures;
    failures.merge(rfail);
    let attempts = {
        let mut l = rlat;
        l.summary().count
    };
    Ok(TlsFloorResult {
        handshakes,
        concurrency,
        ok: latency.count,
        failures,
        per_s: per_second(latency.count, full_m.wall_s),
        server_cpu_per_handshake_ms: per_op(full_m.server_cpu_s * 1e3, latency.count),
        latency,
        resumed_attempts: attempts,
        resumed: resumed.load(Ordering::Relaxed),
        server_cpu_per_resumption_attempt_ms: per_op(resumed_m.server_cpu_s * 1e3, attempts),
        m: full_m,
    })
}

async fn handshake(addr: SocketAddr, tls: &TlsConnector) -> Result<Option<rustls::HandshakeKind>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut stream = tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let kind = stream.get_ref().1.handshake_kind();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.map_err(|e| format!("read: {e}"))?;
    let _ = stream.shutdown().await;
    Ok(kind)
}

/// Provisions the devices of `range` that a scenario needs (not measured); fails on any failure.
pub async fn provision(server: &Server, inst: &FleetgateInstance, range: Range<usize>) -> anyhow::Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let r = storm_fleetgate(server, inst, range, 200, Duration::from_secs(60)).await.context("provisioning")?;
    if r.failures.total() > 0 {
        bail!("provisioning the bench's devices failed: {}", r.failures.describe());
    }
    Ok(())
}
