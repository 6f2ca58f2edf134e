//! Connections that would hold a slot, a file descriptor or memory without doing their part: a
//! TLS connection that sends nothing, a body that trickles, a body sent with a bad token, HTTP/2,
//! a DPS session with a refused token kept alive with PINGREQs, too many connections from one
//! address, partial packets beyond the shared budget, a large packet that stalls, a client that
//! stops reading. Each is shown
//! with small limits; every bound asserted is generous (seconds), the outcome is what is checked.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{device_token, dps_username, Mqtt, TestServer};
use fleetgate_core::keys::SymmetricKey;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Much longer than any limit configured here: reaching it means the server held on.
const BOUND: Duration = Duration::from_secs(10);
const REGISTER: &str = "$dps/registrations/PUT/iotdps-register/?$rid=1";

/// A TLS connection to `addr` trusting the instance CA, or the error that stopped it.
async fn try_tls(s: &TestServer, addr: std::net::SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    tls_over(s, TcpStream::connect(addr).await?).await
}

/// TLS over `tcp`, trusting the instance CA.
async fn tls_over(s: &TestServer, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut s.ca_pem().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg)).connect("localhost".try_into().unwrap(), tcp).await
}

/// Reads until the server closes the connection; what it sent, or `None` if it was still open
/// after [`BOUND`].
async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| got)
}

/// An HTTP/1.1 response's status line from `bytes`.
fn status_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).lines().next().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------------
// HTTPS

#[tokio::test]
async fn a_silent_https_connection_is_closed() {
    let s = TestServer::start_with(|c| c.limits.http_header_timeout = Duration::from_millis(500)).await;
    let mut tls = try_tls(&s, s.https_addr()).await.unwrap();
    // No request at all: the header timeout runs from the handshake.
    let got = read_until_closed(&mut tls).await.expect("a connection that sends nothing is closed");
    assert!(got.is_empty() || status_line(&got).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&got));
}

/// The plain-HTTP metrics listener needs no credentials, so it keeps the device ports' timeouts:
/// a connection that sends nothing, or nothing more after its answer, is closed.
#[tokio::test]
async fn the_metrics_listener_closes_silent_and_idle_connections() {
    let s = TestServer::start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.limits.http_header_timeout = Duration::from_millis(500);
    })
    .await;
    let addr = s.running().metrics_addr.unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    read_until_closed(&mut silent).await.expect("a silent connection is closed");
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut idle).await.expect("an idle keep-alive connection is closed");
    assert_eq!(status_line(&got), "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let s = TestServer::start_with(|c| c.limits.http_header_timeout = Duration::from_millis(500)).await;
    let mut tls = try_tls(&s, s.https_addr()).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut tls).await.expect("the idle keep-alive connection is closed");
    assert_eq!(status_line(&got), "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn http2_is_not_served() {
    let s = TestServer::start().await;
    let mut tls = try_tls(&s, s.https_addr()).await.unwrap();
    // HTTP/2 with prior knowledge: the preface and an empty SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let got = read_until_closed(&mut tls).await.expect("the connection is closed");
    // An HTTP/2 server answers with its SETTINGS frame (type 4 in the fourth byte).
    assert!(!(got.len() >= 9 && got[3] == 4), "HTTP/2 was served: {got:?}");
}

#[tokio::test]
async fn a_body_is_not_waited_for_when_the_token_is_refused() {
    let s = TestServer::start().await;
    let mut tls = try_tls(&s, s.https_addr()).await.unwrap();
    let token = device_token(&SymmetricKey::generate(), &s.scope(), "dev-1");
    let head = format!(
        "PUT /{}/registrations/dev-1/register?api-version=2021-06-01 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
        s.scope()
    );
    // The headers only: the 100 bytes announced never come.
    tls.write_all(head.as_bytes()).await.unwrap();
    let got = read_until_closed(&mut tls).await.expect("answered and closed without the body");
    let text = String::from_utf8_lossy(&got);
    assert_eq!(status_line(&got), "HTTP/1.1 401 Unauthorized", "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
}

#[tokio::test]
async fn a_trickled_body_is_refused_with_408() {
    let s = TestServer::start_with(|c| c.limits.http_body_timeout = Duration::from_secs(1)).await;
    let (primary, _) = s.create_group("grp-slow", json!({})).await;
    let key = primary.derive_device_key("dev-slow");
    let tls = try_tls(&s, s.https_addr()).await.unwrap();
    let (mut rx, mut tx) = tokio::io::split(tls);
    let token = device_token(&key, &s.scope(), "dev-slow");
    let head = format!(
        "PUT /{}/registrations/dev-slow/register?api-version=2021-06-01 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n",
        s.scope()
    );
    tx.write_all(head.as_bytes()).await.unwrap();
    // A byte every 200 ms: the connection is never idle, the body never complete in time.
    let trickle = tokio::spawn(async move {
        for _ in 0..200 {
            if tx.write_all(b" ").await.is_err() || tx.flush().await.is_err() {
                return;
            }
            // Time must pass: the body arrives slower than the body timeout allows.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let got = read_until_closed(&mut rx).await.expect("refused and closed before the body was complete");
    trickle.abort();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(status_line(&got), "HTTP/1.1 408 Request Timeout", "{text}");
    assert!(text.contains("408000"), "{text}");
    // The device was not registered from a part of its body.
    assert!(s.service().get_registration("dev-slow").await.is_err());
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off() {
    let s = TestServer::start_with(|c| {
        c.limits.write_timeout = Duration::from_secs(1);
        // Only the stalled writes may end this connection.
        c.limits.http_header_timeout = Duration::from_secs(600);
    })
    .await;
    // A small receive window, so the server's writes soon have to wait.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(s.https_addr()).await.unwrap();
    let tls = tls_over(&s, tcp).await.unwrap();
    let (mut rx, mut tx) = tokio::io::split(tls);
    // Requests for answers it never reads, until the server stops taking them: once its answers
    // fill the buffers it stops reading, so the writes stall too, and fail only when the server
    // gives up on the connection (a server that waits forever leaves them stalled).
    let asking = tokio::spawn(async move {
        while tx.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await.is_ok() {}
    });
    tokio::time::timeout(Duration::from_secs(60), asking)
        .await
        .expect("the server kept waiting for a reader that had stopped")
        .unwrap();
    // Then reading: what was sent arrives, then the end.
    assert!(read_until_closed(&mut rx).await.is_some(), "the connection ended");
}

// ---------------------------------------------------------------------------------------------
// DPS over MQTT with a refused token

/// A DPS session whose token is refused (CONNACK still accepts it, as Azure does).
async fn refused_dps_session(s: &TestServer, reg: &str) -> Mqtt {
    let mut m = s.mqtt().await;
    let token = device_token(&SymmetricKey::generate(), &s.scope(), reg);
    match m.connect(reg, &dps_username(&s.scope(), reg), Some(&token), true, 60).await {
        Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("{other:?}"),
    }
    m.subscribe_dps().await;
    m
}

/// Sends PINGREQs until the server closes the connection; `false` if it was still open after
/// [`BOUND`].
async fn pings_until_closed(m: &mut Mqtt) -> bool {
    tokio::time::timeout(BOUND, async {
        loop {
            m.send_raw(&[0xC0, 0x00]).await;
            match m.recv().await {
                Some(Packet::PingResp) | Some(Packet::Publish(_)) => {}
                None => return,
                Some(other) => panic!("{other:?}"),
            }
            // Pings spaced out as a device keeping alive would; also the backoff between polls.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_refused_dps_session_kept_alive_with_pings_is_closed() {
    let s = TestServer::start_with(|c| c.limits.unauthenticated_timeout = Duration::from_secs(1)).await;
    let mut m = refused_dps_session(&s, "dev-ping").await;
    assert!(pings_until_closed(&mut m).await, "the session is closed however it pings");
}

#[tokio::test]
async fn a_refused_dps_session_is_closed_soon_after_its_401() {
    // The session timeout alone would keep it for minutes; the 401 answer ends it.
    let s = TestServer::start_with(|c| c.limits.unauthenticated_timeout = Duration::from_secs(600)).await;
    let mut m = refused_dps_session(&s, "dev-401").await;
    m.publish(REGISTER, QoS::AtMostOnce, 0, br#"{"registrationId":"dev-401"}"#).await;
    let (topic, body) = m.expect_publish().await;
    assert!(topic.starts_with("$dps/registrations/res/401/"), "{topic} {body}");
    assert!(pings_until_closed(&mut m).await, "the session is closed after its 401");
}

// ---------------------------------------------------------------------------------------------
// Connections per source address

#[tokio::test]
async fn connections_per_source_address_are_capped() {
    let s = TestServer::start_with(|c| {
        c.limits.max_connections_per_source = 3;
        c.limits.cap_loopback_sources = true;
        c.limits.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(try_tls(&s, s.mqtt_addr()).await.expect("under the cap"));
    }
    // The fourth is closed at once, on either port: the cap is the process's.
    assert!(try_tls(&s, s.mqtt_addr()).await.is_err(), "a fourth MQTT connection was admitted");
    assert!(try_tls(&s, s.https_addr()).await.is_err(), "a fourth HTTPS connection was admitted");
    // A closed connection makes room again (once the server has seen it close).
    drop(held.pop());
    let admitted = tokio::time::timeout(BOUND, async {
        loop {
            if let Ok(c) = try_tls(&s, s.mqtt_addr()).await {
                return c;
            }
            // Backoff between polls.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(admitted.is_ok(), "room was not made when a connection closed");
}

// ---------------------------------------------------------------------------------------------
// Partial MQTT packets

/// The start of a QoS 0 PUBLISH to the register topic whose payload is `payload_len` bytes.
fn publish_head(payload_len: usize) -> Vec<u8> {
    let topic = REGISTER.as_bytes();
    let mut remaining = 2 + topic.len() + payload_len;
    let mut head = vec![0x30];
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        head.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
    head.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    head.extend_from_slice(topic);
    head
}

#[tokio::test]
async fn partial_packets_share_a_memory_budget() {
    // What a connection holds is its read buffer, which grows by doubling: 40 KB of a packet
    // take 64 KiB, 90 KB take 128 KiB. Either fits in 160 KiB on its own; both together do not.
    let s = TestServer::start_with(|c| {
        c.limits.partial_packet_budget_bytes = 160 * 1024;
        c.limits.unauthenticated_timeout = Duration::from_secs(600);
    })
    .await;
    const LEN: usize = 94 * 1024;
    let mut a = refused_dps_session(&s, "dev-a").await;
    a.send_raw(&publish_head(LEN)).await;
    a.send_raw(&vec![b' '; 40 * 1024]).await;
    // B's 90 KB on top of A's 40: B is closed.
    let mut b = refused_dps_session(&s, "dev-b").await;
    b.send_raw(&publish_head(LEN)).await;
    b.send_raw(&vec![b' '; 90 * 1024]).await;
    assert!(b.recv().await.is_none(), "B's partial packet was kept beyond the budget");
    // A was not: its packet completes and is answered.
    a.send_raw(&vec![b' '; LEN - 40 * 1024]).await;
    let (topic, _) = a.expect_publish().await;
    assert!(topic.starts_with("$dps/registrations/res/401/"), "{topic}");
    // With A's packet done and B gone, the budget is free again: C's whole packet gets through.
    let mut c = refused_dps_session(&s, "dev-c").await;
    c.send_raw(&publish_head(LEN)).await;
    c.send_raw(&vec![b' '; LEN]).await;
    let (topic, _) = c.expect_publish().await;
    assert!(topic.starts_with("$dps/registrations/res/401/"), "{topic}");
}

#[tokio::test]
async fn a_large_packet_must_arrive_in_time() {
    let s = TestServer::start_with(|c| {
        c.limits.partial_packet_timeout = Duration::from_secs(1);
        c.limits.unauthenticated_timeout = Duration::from_secs(600);
    })
    .await;
    let mut m = refused_dps_session(&s, "dev-stall").await;
    m.send_raw(&publish_head(50 * 1024)).await;
    m.send_raw(&vec![b' '; 10 * 1024]).await;
    // The keep-alive (60 s) would allow much longer; the packet's own deadline does not.
    let mut rest = BytesMut::new();
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match m.stream.read_buf(&mut rest).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a stalled large packet kept its connection");
}
