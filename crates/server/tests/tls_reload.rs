//! An operator's certificate, replaced while serving: new connections get the new one, open
//! connections are untouched, and a broken replacement is refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use fleetgate_testkit::pki;
use rumqttc::mqttbytes::v4::Packet;

/// A CA and a server certificate for localhost signed by it: (ca pem, cert pem, key pem).
fn issue(name: &str) -> (String, String, String) {
    let ca = pki::root(&format!("{name} CA"));
    let leaf = pki::server(&["localhost", "127.0.0.1"], &ca);
    (ca.pem(), leaf.pem(), leaf.key_pem())
}

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Whether a TLS handshake to `addr` succeeds trusting only `ca_pem`.
async fn handshake(addr: std::net::SocketAddr, ca_pem: &str) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect("localhost".try_into().unwrap(), tcp).await.is_ok()
}

#[tokio::test]
async fn operator_certificate_hot_reload_keeps_open_connections() {
    // The server's tasks run on this test's thread: their log lines land here.
    let (logs, _logging) = common::capture_logs();
    let files = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (files.path().join("server.pem"), files.path().join("server.key"));
    let (ca_a, cert_a, key_a) = issue("A");
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let s = TestServer::start_with(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
        c.cert_check_interval = Duration::from_millis(100);
    })
    .await;
    let addr = s.mqtt_addr();
    assert!(handshake(addr, &ca_a).await, "the operator's certificate is served");
    assert!(!handshake(addr, &String::from_utf8(s.ca_pem()).unwrap()).await, "not the generated one");

    // An open TLS connection (a raw stream that completed its handshake with certificate A).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pemfile::certs(&mut ca_a.as_bytes()).next().unwrap().unwrap()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let mut open = common::Mqtt::from_stream(tls);
    // The device is created through the hub API, which now also presents certificate A.
    let key = fleetgate_core::keys::SymmetricKey::generate();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_a.as_bytes()).unwrap())
        .build()
        .unwrap();
    let body =
        serde_json::json!({"deviceId": "dev-1", "authentication": {"symmetricKey": {"primaryKey": key.to_base64()}}});
    let resp = http
        .put(s.url("/devices/dev-1?api-version=2021-04-12"))
        .header("Authorization", s.hub_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    open.connect_hub(&s, "dev-1", &key).await;

    // Replace the certificate.
    let (ca_b, cert_b, key_b) = issue("B");
    write_atomically(&key_path, &key_b);
    write_atomically(&cert_path, &cert_b);
    common::wait_until("new connections get the new certificate", async || handshake(addr, &ca_b).await).await;
    assert!(!handshake(addr, &ca_a).await);
    // The connection made before the switch still works.
    open.send(Packet::PingReq).await;
    assert!(matches!(open.recv().await, Some(Packet::PingResp)));

    // A broken replacement is refused; the server keeps serving the last good one. The refusal
    // is logged at each check that reads the broken file (a check may also have refused the
    // half-written pair above): wait for one more than before.
    const REFUSED: &str = "server certificate not reloaded";
    let before = logs.count(REFUSED);
    write_atomically(&cert_path, "not a certificate");
    common::wait_until("the broken certificate is checked and refused", async || logs.count(REFUSED) > before).await;
    assert!(handshake(addr, &ca_b).await);
}
