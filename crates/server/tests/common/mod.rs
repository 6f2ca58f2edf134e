//! A real server on loopback (port 0, temp data dir) and raw clients for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fleetgate_client::{ConnectionString, RawDpsClient};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::build_token;
use fleetgate_core::time::Timestamp;
use fleetgate_server::{RunningServer, ServerConfig};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub config: ServerConfig,
}

pub fn config(dir: &std::path::Path) -> ServerConfig {
    let mut c = ServerConfig::new(dir.to_path_buf());
    c.mqtt_port = 0;
    c.https_port = 0;
    c.limits.handshake_timeout = Duration::from_millis(700);
    // A small free-space reserve: the tests must not depend on how full this machine's disk is
    // (the reserve's own tests set theirs).
    c.disk_reserve_bytes = Some(TEST_DISK_RESERVE);
    c
}

/// The free-space reserve test servers keep (64 MiB).
pub const TEST_DISK_RESERVE: u64 = 64 << 20;

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        f(&mut c);
        let server = fleetgate_server::start(c.clone()).await.unwrap();
        Self { server: Some(server), dir, config: c }
    }

    pub fn running(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.running().mqtt_addr
    }
    pub fn https_addr(&self) -> SocketAddr {
        self.running().https_addr
    }
    pub fn scope(&self) -> String {
        self.running().instance.id_scope.clone()
    }
    pub fn hub(&self) -> String {
        self.running().instance.hubs[0].host_name.clone()
    }
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.pem")).unwrap()
    }
    pub fn service_connection_string(&self) -> ConnectionString {
        self.running().instance.service_connection_string.parse().unwrap()
    }
    /// The DPS service client on raw JSON: these tests check the server's wire shapes.
    pub fn service(&self) -> RawDpsClient {
        RawDpsClient::new(self.service_connection_string(), Some(&self.ca_pem())).unwrap()
    }
    pub fn service_token(&self) -> String {
        let c = self.service_connection_string();
        build_token(&c.key, &c.host_name, Timestamp::now().unix_seconds() + 600, Some(&c.key_name))
    }
    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.ca_pem()).unwrap())
            .build()
            .unwrap()
    }
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https_addr().port())
    }

    /// Creates a symmetric-key group; returns its (primary, secondary) keys.
    pub async fn create_group(&self, id: &str, extra: Value) -> (SymmetricKey, SymmetricKey) {
        let mut g = json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey"}});
        for (k, v) in extra.as_object().unwrap() {
            g[k] = v.clone();
        }
        let g = self.service().put_enrollment_group(&g, None).await.unwrap();
        let sk = &g["attestation"]["symmetricKey"];
        (
            SymmetricKey::from_base64(sk["primaryKey"].as_str().unwrap()).unwrap(),
            SymmetricKey::from_base64(sk["secondaryKey"].as_str().unwrap()).unwrap(),
        )
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// A TLS 1.2 connection to the MQTT port, trusting the instance CA.
    pub async fn tls(&self) -> TlsStream<TcpStream> {
        self.tls_to(self.mqtt_addr(), &[&rustls::version::TLS12]).await
    }

    /// A TLS connection to `addr` with rustls' default client suites (in their order) and the
    /// given versions, trusting the instance CA.
    pub async fn tls_to(
        &self,
        addr: SocketAddr,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut self.ca_pem().as_slice()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(Arc::new(cfg)).connect("localhost".try_into().unwrap(), tcp).await.unwrap()
    }

    pub async fn mqtt(&self) -> Mqtt {
        Mqtt { stream: self.tls().await, buf: BytesMut::new() }
    }
}

/// A raw MQTT client: packets in, packets out, nothing hidden.
pub struct Mqtt {
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Mqtt {
    pub async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        self.stream.write_all(&b).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet; `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if !self.buf.is_empty() {
                    match Packet::read(&mut self.buf, 1 << 20) {
                        Ok(p) => return Some(p),
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(e) => panic!("server sent a malformed packet: {e:?}"),
                    }
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("server neither answered nor closed within 10 s")
    }

    pub async fn connect(
        &mut self,
        client_id: &str,
        username: &str,
        password: Option<&str>,
        clean: bool,
        keep_alive: u16,
    ) -> Packet {
        let mut c = Connect::new(client_id);
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        c.login = Some(Login::new(username, password.unwrap_or("")));
        self.send(Packet::Connect(c)).await;
        self.recv().await.expect("CONNACK")
    }

    pub async fn subscribe_dps(&mut self) -> Packet {
        let mut s = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
        s.pkid = 1;
        self.send(Packet::Subscribe(s)).await;
        self.recv().await.expect("SUBACK")
    }

    pub async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, body: &[u8]) {
        let mut p = Publish::new(topic, qos, body.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
    }

    /// Waits for the next PUBLISH, skipping nothing: anything else is returned as an error.
    pub async fn expect_publish(&mut self) -> (String, Value) {
        match self.recv().await {
            Some(Packet::Publish(p)) => (p.topic.clone(), serde_json::from_slice(&p.payload).expect("JSON body")),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

/// Polls `f` until it holds; panics naming `what` if it does not within 15 s (a generous bound:
/// the outcome is asserted, not the timing).
pub async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached within 15 s");
        // Backoff between polls.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The username the Python SDK sends.
pub fn dps_username(scope: &str, reg: &str) -> String {
    format!("{scope}/registrations/{reg}/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%283.11.7%3BLinux%29")
}

/// A device token in the Python SDK's form (percent-encoded `sr`, no `skn`).
pub fn device_token(key: &SymmetricKey, scope: &str, reg: &str) -> String {
    build_token(key, &format!("{scope}/registrations/{reg}"), Timestamp::now().unix_seconds() + 3600, None)
}

impl TestServer {
    /// A hub service token (`iothubowner`) for the instance's first hub.
    pub fn hub_token(&self) -> String {
        let c: ConnectionString = self.running().instance.hubs[0].connection_string.parse().unwrap();
        build_token(&c.key, &c.host_name, Timestamp::now().unix_seconds() + 600, Some(&c.key_name))
    }

    /// `GET {path}` on the hub service API with the owner's token (`path` without api-version);
    /// the JSON answer.
    pub async fn hub_get(&self, path: &str) -> Value {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.http()
            .get(self.url(&format!("{path}{sep}api-version=2021-04-12")))
            .header("Authorization", self.hub_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Creates a hub device with a fresh key through the service API; returns the key.
    pub async fn create_device(&self, id: &str) -> SymmetricKey {
        let key = SymmetricKey::generate();
        let body = json!({"deviceId": id, "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key.to_base64(), "secondaryKey": SymmetricKey::generate().to_base64()}}});
        let resp = self
            .http()
            .put(self.url(&format!("/devices/{id}?api-version=2021-04-12")))
            .header("Authorization", self.hub_token())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        key
    }

    /// A raw MQTT connection to the hub as `id`, CONNACK checked; `None` if refused.
    pub async fn hub_device(
        &self,
        id: &str,
        key: &SymmetricKey,
    ) -> Result<Mqtt, rumqttc::mqttbytes::v4::ConnectReturnCode> {
        self.hub_device_session(id, key, false).await.map(|(m, _)| m)
    }

    /// Like `hub_device`, choosing CleanSession; also returns CONNACK's session-present flag.
    pub async fn hub_device_session(
        &self,
        id: &str,
        key: &SymmetricKey,
        clean: bool,
    ) -> Result<(Mqtt, bool), rumqttc::mqttbytes::v4::ConnectReturnCode> {
        self.hub_connect(id, key, clean, 60).await
    }

    /// A raw MQTT connection to the hub as `id` with this CleanSession and keep-alive (seconds).
    pub async fn hub_connect(
        &self,
        id: &str,
        key: &SymmetricKey,
        clean: bool,
        keep_alive: u16,
    ) -> Result<(Mqtt, bool), rumqttc::mqttbytes::v4::ConnectReturnCode> {
        let hub = self.hub();
        let token = build_token(key, &format!("{hub}/devices/{id}"), Timestamp::now().unix_seconds() + 3600, None);
        let mut m = self.mqtt().await;
        let user = format!("{hub}/{id}/?api-version=2019-10-01&DeviceClientType=test");
        match m.connect(id, &user, Some(&token), clean, keep_alive).await {
            Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success => {
                Ok((m, a.session_present))
            }
            Packet::ConnAck(a) => Err(a.code),
            other => panic!("{other:?}"),
        }
    }

    /// Waits until the hub reports device `id` disconnected. A session's end is complete only
    /// then: the hub unregisters it (and notes when it went offline) after everything else the
    /// session does on its way out (a Will forwarded, the connection shut), so a reconnect or a
    /// check made after this sees the state that session left.
    pub async fn wait_disconnected(&self, id: &str) {
        let path = format!("/devices/{id}");
        wait_until(&format!("the hub reports {id} disconnected"), async || {
            self.hub_get(&path).await["connectionState"] == "Disconnected"
        })
        .await;
    }

    /// `GET /messages/events?from=0&format=json`.
    pub async fn stored_events(&self) -> Vec<Value> {
        self.http()
            .get(self.url("/messages/events?api-version=2021-04-12&from=0&format=json"))
            .header("Authorization", self.hub_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Mqtt {
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, pkid: u16) -> Packet {
        let mut s = Subscribe::new(filter, qos);
        s.pkid = pkid;
        self.send(Packet::Subscribe(s)).await;
        self.recv().await.expect("SUBACK")
    }

    /// The next PUBLISH, raw.
    pub async fn next_publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) => return p,
                Some(Packet::PubAck(_)) => continue,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }
}

impl TestServer {
    /// Registers `reg` over DPS MQTT with `key` (Python-style token), following 202 + polling,
    /// and returns the final `RegistrationOperationStatus` body (or the error body).
    pub async fn register(&self, reg: &str, key: &SymmetricKey, payload: Option<Value>) -> (String, Value) {
        let mut m = self.mqtt().await;
        m.connect(reg, &dps_username(&self.scope(), reg), Some(&device_token(key, &self.scope(), reg)), true, 60).await;
        m.subscribe_dps().await;
        let body = json!({"payload": payload, "registrationId": reg}).to_string();
        m.publish("$dps/registrations/PUT/iotdps-register/?$rid=r0", QoS::AtMostOnce, 0, body.as_bytes()).await;
        for i in 1..=40 {
            let (topic, body) = m.expect_publish().await;
            if !topic.starts_with("$dps/registrations/res/202/") {
                return (topic, body);
            }
            // Backoff between status polls, as a device waits before asking again.
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            let op = body["operationId"].as_str().unwrap().to_owned();
            m.publish(
                &format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r{i}&operationId={op}"),
                QoS::AtMostOnce,
                0,
                b" ",
            )
            .await;
        }
        panic!("registration of {reg} never finished");
    }

    /// Links another hub to the instance through the service API (as `fleetgate hub create`),
    /// with a weight.
    pub async fn add_hub(&self, host: &str, weight: u32) {
        let hub = self.service().put_linked_hub(host, &json!({"allocationWeight": weight}), false).await.unwrap();
        assert_eq!(hub["allocationWeight"], weight, "{hub}");
    }

    pub fn store(&self) -> fleetgate_store::SqliteStore {
        fleetgate_store::SqliteStore::open(&self.dir.path().join("fleetgate.db")).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// X.509: TLS with a client certificate

impl TestServer {
    /// A TLS connection to `addr` that presents `chain_pem` (leaf first) with `key_pem`, trusting
    /// the instance CA; TLS 1.2 (as the Python SDK) unless `tls13`. A refused chain is an error.
    pub async fn tls_with_cert(
        &self,
        addr: SocketAddr,
        chain_pem: &str,
        key_pem: &str,
        tls13: bool,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut self.ca_pem().as_slice()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<_> = rustls_pemfile::certs(&mut chain_pem.as_bytes()).map(Result::unwrap).collect();
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).unwrap().unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let version = if tls13 { &rustls::version::TLS13 } else { &rustls::version::TLS12 };
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(Arc::new(cfg)).connect("localhost".try_into().unwrap(), tcp).await
    }

    /// A raw MQTT connection to the MQTT port presenting a client certificate (TLS 1.2).
    pub async fn mqtt_with_cert(&self, chain_pem: &str, key_pem: &str) -> Mqtt {
        let stream = self.tls_with_cert(self.mqtt_addr(), chain_pem, key_pem, false).await.unwrap();
        Mqtt { stream, buf: BytesMut::new() }
    }
}

impl Mqtt {
    /// A raw MQTT client over a TLS stream made elsewhere (e.g. `tls_with_cert` with TLS 1.3).
    pub fn from_stream(stream: TlsStream<TcpStream>) -> Self {
        Mqtt { stream, buf: BytesMut::new() }
    }
}

impl Mqtt {
    /// CONNECT as a hub device with a SAS for `key`; panics unless accepted.
    pub async fn connect_hub(&mut self, s: &TestServer, id: &str, key: &SymmetricKey) {
        let hub = s.hub();
        let token = build_token(key, &format!("{hub}/devices/{id}"), Timestamp::now().unix_seconds() + 3600, None);
        match self.connect(id, &format!("{hub}/{id}/?api-version=2019-10-01"), Some(&token), true, 60).await {
            Packet::ConnAck(a) => assert_eq!(a.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success),
            other => panic!("{other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Log capture

/// Captures what this thread logs (DEBUG and up) until the guard drops. The server's tasks log
/// here only on a single-threaded runtime (`#[tokio::test]`'s default flavor).
pub fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    (logs.clone(), tracing::subscriber::set_default(subscriber))
}

/// The log output, kept for the test to read.
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap()).lines().map(str::to_owned).collect()
    }

    /// How many lines contain `message`.
    pub fn count(&self, message: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(message)).count()
    }

    pub fn line_with(&self, message: &str) -> String {
        let lines = self.lines();
        lines.iter().find(|l| l.contains(message)).cloned().unwrap_or_else(|| panic!("no {message:?} in {lines:#?}"))
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
