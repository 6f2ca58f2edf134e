//! TLS for device connections: rustls with the ring provider, TLS 1.2 and 1.3, trusting only the
//! CA given (Fleetgate's `ca.pem`).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::DeviceError;

/// A client configuration trusting only the certificates in `ca_pem`.
///
/// rumqttc verifies the server certificate against the address it connects to. When
/// `server_name` differs from `connect_host` (connecting to `127.0.0.1` a server whose
/// certificate says `localhost`, as `curl --resolve` does), the certificate is verified against
/// `server_name` instead; everything else about the check is unchanged.
pub(crate) fn client_config(
    ca_pem: &[u8],
    connect_host: &str,
    server_name: Option<&str>,
) -> Result<Arc<ClientConfig>, DeviceError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| DeviceError::tls(format!("reading the CA certificate: {e}")))?;
        roots.add(cert).map_err(|e| DeviceError::tls(format!("adding the CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(DeviceError::tls("the CA PEM holds no certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| DeviceError::tls(e.to_string()))?;
    let config = match server_name.filter(|n| !n.eq_ignore_ascii_case(connect_host)) {
        None => builder.with_root_certificates(roots).with_no_client_auth(),
        Some(name) => {
            let name = ServerName::try_from(name.to_owned())
                .map_err(|e| DeviceError::tls(format!("invalid TLS server name '{name}': {e}")))?;
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| DeviceError::tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedNameVerifier { inner, name }))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Full WebPKI verification, against a fixed server name rather than the connect address.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connect_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
