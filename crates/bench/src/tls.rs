//! TLS as the project configures it, for the peers the device client does not cover.
//!
//! - [`client_config`] is what `fleetgate_client::device` builds for every connection (ring
//!   provider, TLS 1.3 and 1.2, trusting only the given CA); the bench uses it for Mosquitto and
//!   for raw connections, so every server faces the same client.
//! - [`server_config`] is `fleetgate_server::tls::server_config` (ring, TLS 1.3 and 1.2, one
//!   certificate, no client auth): the TLS floor is measured with exactly Fleetgate's setup.
//! - [`generate_pki`] issues a CA and an ECDSA P-256 server certificate with rcgen, shaped like
//!   Fleetgate's, for Mosquitto.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client configuration trusting only the certificates in `ca_pem` (as the device client's).
/// The device client builds one per connection, so it never resumes a session; a configuration
/// shared by many connections resumes only when `resume` is set.
pub fn client_config(ca_pem: &[u8], resume: bool) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.context("reading the CA certificate")?).context("adding the CA certificate")?;
    }
    if roots.is_empty() {
        return Err(anyhow!("the CA PEM holds no certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// Fleetgate's server configuration for a certificate and key in PEM files.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let data = std::fs::read(cert_pem).with_context(|| cert_pem.display().to_string())?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut data.as_slice()).collect::<Result<_, _>>()?;
    let data = std::fs::read(key_pem).with_context(|| key_pem.display().to_string())?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut data.as_slice())?.ok_or_else(|| anyhow!("no private key"))?;
    let provider = Arc::new(fleetgate_server::tls::crypto_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    fleetgate_server::tls::prefer_own_suite_order(&mut config);
    Ok(Arc::new(config))
}

/// PEMs of a fresh CA and a server certificate for `localhost` and `127.0.0.1` it signed.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn generate_pki() -> anyhow::Result<Pki> {
    let ca_key = KeyPair::generate()?; // ECDSA P-256, as Fleetgate's
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "fleetgate-bench CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = p.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    Ok(Pki { ca_pem: ca.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The hidden `tls-server` subcommand: a TLS endpoint with Fleetgate's configuration that does
/// nothing but handshakes (each connection is read until the client closes it). Run as a child
/// process so its CPU time is its own.
pub async fn serve_handshakes(listen: SocketAddr, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(cert, key)?);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                // One byte of application data: the client reads it, and with it the session
                // tickets TLS 1.3 sends after the handshake (so it can resume next time).
                if tls.write_all(b"k").await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                let mut buf = [0u8; 64];
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}
